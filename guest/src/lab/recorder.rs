//! The probes recorder (`tdpshare-probe record`) as a child process: started before the L2
//! VM exists, filtered to this process, stopped with SIGINT, its trace read back.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use tdpshare::TraceReader;
use tdpshare::event::Event;

/// A running recorder.
#[derive(Debug)]
pub struct Recorder {
    child: Child,
    output: PathBuf,
    /// What it printed after the status table (its summary), collected by the reader thread.
    lines: mpsc::Receiver<String>,
    /// "recording with N of M probes attached".
    pub attached: String,
}

impl Recorder {
    /// Starts `program record -o output [--pid pid]` and waits (up to `timeout`:
    /// loading eBPF under TCG takes seconds) until it reports what attached. Its status table
    /// is echoed with a `probe: ` prefix.
    pub fn start(
        program: &Path,
        output: &Path,
        pid: Option<u32>,
        timeout: Duration,
    ) -> anyhow::Result<Recorder> {
        let mut command = Command::new(program);
        command.arg("record").arg("-o").arg(output);
        if let Some(pid) = pid {
            command.arg("--pid").arg(pid.to_string());
        }
        let mut child = command
            // Pre-population writes ~300 000 records in a few seconds; a recorder writing
            // JSON under nested TCG drains far slower, so the burst must fit.
            .args(["--ring-mib", "64"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let stderr = child.stderr.take().context("the recorder's stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                println!("probe: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let attached = loop {
            match rx.recv_timeout(timeout) {
                Ok(line) if line.starts_with("recording with") => break line,
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    bail!(
                        "the recorder did not start recording within {timeout:?} \
                         (exit status {status:?})"
                    );
                }
            }
        };
        Ok(Recorder {
            child,
            output: output.to_path_buf(),
            lines: rx,
            attached,
        })
    }

    /// Stops it (SIGINT: it finishes the trace) and reads the trace.
    pub fn stop(mut self) -> anyhow::Result<Recording> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: signalling the child this value started and has not reaped.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let status = self.child.wait().context("waiting for the recorder")?;
        let mut drops = None;
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            drops = drops.or_else(|| dropped(&line));
        }
        if !status.success() {
            bail!("the recorder failed ({status})");
        }
        let drops =
            drops.context("the recorder's summary did not say how many records it dropped")?;
        let reader = TraceReader::open(&self.output)
            .with_context(|| format!("reading the trace {}", self.output.display()))?;
        let events = reader
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("reading the trace {}", self.output.display()))?;
        Ok(Recording { events, drops })
    }
}

/// What a recorder left.
#[derive(Debug)]
pub struct Recording {
    pub events: Vec<Event>,
    /// Records the kernel could not put in the ring buffer: the trace lacks them.
    pub drops: u64,
}

/// The count in the summary's "... (N dropped in the kernel, ..." line.
fn dropped(line: &str) -> Option<u64> {
    let (before, _) = line.split_once(" dropped in the kernel")?;
    before.rsplit('(').next()?.trim().parse().ok()
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // Stopped without `stop` (an earlier error): do not leave it running.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_s_drop_count_is_read() {
        let line = "95050 events from 126002 records written to /lab/trace.jsonl \
                    (190337 dropped in the kernel, 0 undecodable, 30952 without event)";
        assert_eq!(dropped(line), Some(190_337));
        assert_eq!(dropped("  pid 84  kvm_mmu_get_page 40"), None);
    }
}
