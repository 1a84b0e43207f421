//! Root-only: the probes watch a real QEMU/KVM guest (SeaBIOS) for a few seconds and must see
//! its memslot ioctls and its shadow-page allocations, attributed to its pid and only to it.
//! Skips, saying why, without root, /dev/kvm, QEMU or a built eBPF object.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tdpshare::event::EventKind;
use tdpshare_probes::loader::{LoadOptions, ProbeState, Session};
use tdpshare_probes_common::ProbeId;

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    if !std::path::Path::new("/dev/kvm").exists() {
        return Some("no /dev/kvm".into());
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        return Some("qemu-system-x86_64 is not installed".into());
    }
    None
}

#[test]
fn probes_see_a_real_guest_and_only_it() {
    if let Some(reason) = skip_reason() {
        println!("skipped: {reason}");
        return;
    }
    // A shell that waits on stdin, then becomes QEMU (same pid): the probes are filtered to
    // that pid before QEMU issues its first ioctl.
    let mut child = Command::new("sh")
        .args([
            "-c",
            "read go; exec qemu-system-x86_64 -enable-kvm -m 256M -nographic -nodefaults -display none",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn QEMU");
    let pid = child.id();
    let mut session = Session::start(&LoadOptions {
        pid: Some(pid),
        ..LoadOptions::default()
    });
    if let Some(s) = session
        .statuses
        .iter()
        .find(|s| matches!(s.state, ProbeState::NotBuilt(_)))
    {
        let _ = child.kill();
        let _ = child.wait();
        println!("skipped: {}", s.state);
        return;
    }
    for s in &session.statuses {
        println!("{}:{} {}", s.probe.system, s.probe.event, s.state);
    }
    assert!(session.attached() >= 4, "too few probes attached");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"go\n")
        .expect("start QEMU");
    let mut events = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        session.poll(&mut events);
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    session.poll(&mut events);

    let counters = session.counters();
    println!("{} events; counters {:?}", events.len(), counters.counts);
    assert!(!events.is_empty(), "no event from the guest");
    assert!(
        events.iter().all(|e| e.vm == u64::from(pid)),
        "events of other processes leaked past the pid filter"
    );
    let count = |f: fn(&EventKind) -> bool| events.iter().filter(|e| f(&e.kind)).count();
    let adds = count(|k| matches!(k, EventKind::MemslotAdd(_)));
    let deletes = count(|k| matches!(k, EventKind::MemslotDelete(_)));
    assert!(adds >= 3, "QEMU's memslot ioctls not seen ({adds})");
    let get_page = counters
        .counts
        .get(&(pid, ProbeId::KvmMmuGetPage as u32))
        .copied()
        .unwrap_or(0);
    assert!(get_page > 0, "no kvm_mmu_get_page for the guest");
    assert!(counters.counts.keys().all(|(tgid, _)| *tgid == pid));
    // With the CO-RE probe attached every root is named by its table's physical address
    // (page-aligned, never one of the small numbers roots get without it).
    let core = session
        .statuses
        .iter()
        .any(|s| s.probe.core && s.state == ProbeState::Attached);
    let roots: Vec<u64> = events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::RootAlloc(r) => Some(r.root),
            _ => None,
        })
        .collect();
    assert!(!roots.is_empty(), "no root allocation of the guest");
    if core {
        assert!(
            roots.iter().all(|&r| r % 4096 == 0 && r >= 1 << 20),
            "roots are not table addresses: {roots:x?}"
        );
    }
    // kvm_exit fires on every exit; the kernel keeps only CR0/CR4 writes, each one event.
    let cr_exits = counters
        .counts
        .get(&(pid, ProbeId::KvmExit as u32))
        .copied()
        .unwrap_or(0);
    let cr_writes = count(|k| matches!(k, EventKind::CrWrite { .. }));
    assert!(
        cr_exits as usize <= cr_writes,
        "{cr_exits} kvm_exit records kept, {cr_writes} CR writes decoded"
    );
    assert_eq!(counters.drops, 0);
    // Every memslot ioctl was timed in the kernel.
    let hist = counters
        .latency
        .get(&(pid, ProbeId::IoctlSetUserMemoryRegion as u32))
        .expect("memslot ioctl latency histogram");
    assert_eq!(hist.count as usize, adds + deletes);
}

#[test]
fn a_recording_of_one_vmm_names_it_and_ends_when_it_exits() {
    if let Some(reason) = skip_reason() {
        println!("skipped: {reason}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("tdpshare-live-name-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("guest.jsonl");
    let mut qemu = Command::new("sh")
        .args([
            "-c",
            "read go; exec qemu-system-x86_64 -name guest=named-guest,debug-threads=on \
             -enable-kvm -m 256M -nographic -nodefaults -display none",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn QEMU");
    let pid = qemu.id();
    let recorder = Command::new(env!("CARGO_BIN_EXE_tdpshare-probe"))
        .args(["record", "--pid", &pid.to_string(), "-o"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let partial = out.with_extension("jsonl.partial");
    let start = Instant::now();
    while !partial.exists() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    qemu.stdin
        .take()
        .unwrap()
        .write_all(b"go\n")
        .expect("start QEMU");
    std::thread::sleep(Duration::from_secs(3));
    let _ = qemu.kill();
    let _ = qemu.wait();
    // No signal to the recorder: the VMM's exit ends it.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(recorder.wait_with_output());
    });
    let o = done_rx
        .recv_timeout(Duration::from_secs(15))
        .expect("the recorder went on after its VMM exited")
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    if stderr.contains("not built") {
        println!("skipped: eBPF programs not built");
        return;
    }
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("the VMM (pid {pid}) exited")),
        "{stderr}"
    );
    let events: Vec<_> = tdpshare::TraceReader::open(&out)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(events.len() > 1, "{stderr}");
    assert_eq!(
        events[0].kind,
        EventKind::VmName {
            name: "named-guest".into()
        }
    );
    assert_eq!(events[0].vm, u64::from(pid));
    let names = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::VmName { .. }))
        .count();
    assert_eq!(names, 1, "one name per VM");
    let _ = std::fs::remove_dir_all(&dir);
}
