//! The VMM processes events come from: their names (what a trace keeps of a VM once its pid
//! means nothing), and whether they still run.

use std::collections::HashSet;

use tdpshare::event::{Event, EventKind, VmId};

/// The VM name in a VMM's command line (`-name guest=X,...` or `-name X`), else its program.
pub fn name(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    name_in(&raw)
}

/// [`name`] from the bytes of `/proc/PID/cmdline` (arguments separated by NUL).
pub fn name_in(cmdline: &[u8]) -> Option<String> {
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if let Some(i) = args.iter().position(|a| a == "-name") {
        let v = args.get(i + 1)?;
        let v = v.strip_prefix("guest=").unwrap_or(v);
        return Some(v.split(',').next().unwrap_or(v).to_owned());
    }
    args.first()
        .map(|p| p.rsplit('/').next().unwrap_or(p).to_owned())
}

/// Is process `pid` running? A zombie (exited, not yet reaped by its parent) is not.
pub fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses, which may itself hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Names each VM once, when its first event comes: a [`EventKind::VmName`] event to go before
/// it (same time, same VM), with the VMM's name while the VMM still runs to be asked.
#[derive(Debug, Default)]
pub struct Namer {
    seen: HashSet<VmId>,
    names: std::collections::BTreeMap<VmId, String>,
}

impl Namer {
    /// The name event to put before `e`, if `e` is its VM's first; `lookup` finds the name of
    /// a VMM pid ([`name`] live).
    pub fn first(
        &mut self,
        e: &Event,
        lookup: impl FnOnce(u32) -> Option<String>,
    ) -> Option<Event> {
        if matches!(e.kind, EventKind::VmName { .. }) || !self.seen.insert(e.vm) {
            return None;
        }
        let name = u32::try_from(e.vm).ok().and_then(lookup)?;
        self.names.insert(e.vm, name.clone());
        Some(Event::new(
            e.ts_ns,
            e.vm,
            e.source,
            EventKind::VmName { name },
        ))
    }

    /// Forgets VM `vm` (its series are gone): a later VMM with the same pid is named anew.
    pub fn forget(&mut self, vm: VmId) {
        self.seen.remove(&vm);
        self.names.remove(&vm);
    }

    /// The name events of every VM named so far, at time `ts_ns`: what a new segment of a
    /// rotated recording starts with, so that each file names its VMs.
    pub fn all(&self, ts_ns: u64) -> Vec<Event> {
        self.names
            .iter()
            .map(|(&vm, name)| {
                Event::new(
                    ts_ns,
                    vm,
                    tdpshare::event::Source::Live,
                    EventKind::VmName { name: name.clone() },
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tdpshare::event::Source;

    #[test]
    fn names_come_from_the_command_line() {
        let qemu = b"/usr/bin/qemu-system-x86_64\0-name\0guest=web1,debug-threads=on\0-m\x001G\0";
        assert_eq!(name_in(qemu).as_deref(), Some("web1"));
        assert_eq!(name_in(b"qemu\0-name\0db\0").as_deref(), Some("db"));
        assert_eq!(
            name_in(b"/opt/bin/cloud-hypervisor\0--memory\0").as_deref(),
            Some("cloud-hypervisor")
        );
        assert_eq!(name_in(b"qemu\0-name\0"), None);
        assert_eq!(name_in(b""), None);
    }

    #[test]
    fn this_process_runs_and_a_reaped_child_does_not() {
        assert!(running(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!running(pid));
        assert!(!running(0));
    }

    #[test]
    fn a_zombie_is_not_running() {
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited, not reaped: /proc still lists it, as state Z.
        let start = std::time::Instant::now();
        while running(pid) && start.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        assert!(!running(pid));
        drop(child);
    }

    #[test]
    fn each_vm_is_named_once_before_its_first_event() {
        let mut n = Namer::default();
        let e = |vm| {
            Event::new(
                5,
                vm,
                Source::Live,
                EventKind::SmmTransition { enter: true },
            )
        };
        let named = n.first(&e(7), |pid| Some(format!("vm-of-{pid}"))).unwrap();
        assert_eq!(
            named.kind,
            EventKind::VmName {
                name: "vm-of-7".into()
            }
        );
        assert_eq!((named.ts_ns, named.vm), (5, 7));
        assert!(n.first(&e(7), |_| Some("again".into())).is_none());
        // A VMM gone before its name was asked: no name, and no second try.
        assert!(n.first(&e(8), |_| None).is_none());
        assert!(n.first(&e(8), |_| Some("late".into())).is_none());
        let all = n.all(0);
        assert_eq!(all.len(), 1);
        assert_eq!(
            all[0].kind,
            EventKind::VmName {
                name: "vm-of-7".into()
            }
        );
    }
}
