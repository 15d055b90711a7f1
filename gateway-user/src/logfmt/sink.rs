//! Where log lines go: a bounded buffer in memory, written to stderr by one
//! thread of its own, so that no worker ever waits on the log.
//!
//! A line is copied into the buffer under a lock held only for the copy. The
//! writer thread wakes at the first line after a quiet spell and writes it at
//! once; while lines keep coming it writes at most once per [`GATHER`], all
//! that waits in as few `write` calls as the kernel takes, so a busy gateway
//! writes its access log in batches of a hundred lines or more instead of one
//! system call per request. When stderr is
//! slower than the gateway (a stalled log pipe, a full disk), the buffer fills
//! to [`MAX_PENDING_BYTES`] and further lines are dropped and counted, never
//! the request. Lines reach stderr within [`GATHER`] plus the write, and
//! [`flush`] writes whatever waits (the gateway calls it on shutdown, at exit
//! and on a panic).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// While lines keep coming, the least time between the starts of two writes
/// (the most a line waits when the writer keeps up).
pub const GATHER: Duration = Duration::from_millis(5);

/// Most bytes waiting to be written; lines beyond it are dropped and counted.
pub const MAX_PENDING_BYTES: usize = 4 << 20;

/// What the sink has done since start, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// Lines written to the output.
    pub written_lines: u64,
    /// Lines dropped: the buffer was full, or the output refused them.
    pub dropped_lines: u64,
    /// Bytes taken and not yet written (waiting, or in a write right now).
    pub pending_bytes: u64,
}

struct Queue {
    /// Lines waiting, whole.
    buf: Vec<u8>,
    /// How many lines `buf` holds.
    lines: u64,
    /// Bytes of the batch being written right now.
    writing: usize,
    /// The writer waits for a first line (a line must wake it).
    idle: bool,
    /// A flush is waited for: write without gathering.
    urgent: bool,
    /// Bytes taken since start, and bytes written (or given up) since start:
    /// a flush waits until what was taken when it began is done.
    taken: u64,
    done: u64,
}

/// The buffer and its writer's counters.
pub struct Sink {
    queue: Mutex<Queue>,
    /// Wakes the writer (a first line, a flush).
    wake: Condvar,
    /// Wakes flushes (a batch written).
    written: Condvar,
    written_lines: AtomicU64,
    dropped_lines: AtomicU64,
    pending_bytes: AtomicU64,
    max_pending: usize,
    gather: Duration,
}

impl Sink {
    fn new(max_pending: usize, gather: Duration) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(Queue {
                buf: Vec::new(),
                lines: 0,
                writing: 0,
                idle: true,
                urgent: false,
                taken: 0,
                done: 0,
            }),
            wake: Condvar::new(),
            written: Condvar::new(),
            written_lines: AtomicU64::new(0),
            dropped_lines: AtomicU64::new(0),
            pending_bytes: AtomicU64::new(0),
            max_pending,
            gather,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes one whole line (or drops it when the buffer is full).
    pub fn push(&self, line: &[u8]) {
        let mut queue = self.lock();
        if queue.buf.len() + line.len() > self.max_pending {
            drop(queue);
            self.dropped_lines.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let half = self.max_pending / 2;
        let crossed_half = queue.buf.len() < half && queue.buf.len() + line.len() >= half;
        queue.buf.extend_from_slice(line);
        queue.lines += 1;
        queue.taken += line.len() as u64;
        self.pending_bytes.fetch_add(line.len() as u64, Ordering::Relaxed);
        // Wake the writer for a first line, or to write a half-full buffer
        // before its gathering period ends.
        if queue.idle || crossed_half {
            queue.idle = false;
            drop(queue);
            self.wake.notify_one();
        }
    }

    /// What the sink has done so far.
    pub fn stats(&self) -> SinkStats {
        SinkStats {
            written_lines: self.written_lines.load(Ordering::Relaxed),
            dropped_lines: self.dropped_lines.load(Ordering::Relaxed),
            pending_bytes: self.pending_bytes.load(Ordering::Relaxed),
        }
    }

    /// Writes whatever waits now, and returns once it is written (or at
    /// `timeout`: an output that does not take lines must not hold the exit).
    /// Lines taken after the call began are not waited for. Whether all that
    /// waited was written.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut queue = self.lock();
        let target = queue.taken;
        loop {
            if queue.done >= target {
                return true;
            }
            queue.urgent = true;
            self.wake.notify_one();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            queue = self.written.wait_timeout(queue, left).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// The writer thread: waits for lines, writes them, and while lines keep
    /// coming writes at most once per gathering period.
    fn run(&self, out: &mut dyn std::io::Write) {
        let mut spare = Vec::new();
        let mut last_write: Option<Instant> = None;
        let mut queue = self.lock();
        loop {
            while queue.buf.is_empty() {
                queue.idle = true;
                queue.urgent = false;
                queue = self.wake.wait(queue).unwrap_or_else(PoisonError::into_inner);
            }
            // A line after a quiet spell goes out at once; lines that keep
            // coming gather until a period after the last write began, unless
            // a flush waits or the buffer is half full.
            if let Some(gather_until) = last_write.map(|at| at + self.gather) {
                while !queue.urgent && queue.buf.len() < self.max_pending / 2 {
                    let left = gather_until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    queue = self.wake.wait_timeout(queue, left).unwrap_or_else(PoisonError::into_inner).0;
                }
            }
            last_write = Some(Instant::now());
            std::mem::swap(&mut queue.buf, &mut spare);
            // A flush still waiting after this write asks again.
            queue.urgent = false;
            let lines = std::mem::take(&mut queue.lines);
            queue.writing = spare.len();
            drop(queue);

            let result = out.write_all(&spare).and_then(|()| out.flush());
            match result {
                Ok(()) => self.written_lines.fetch_add(lines, Ordering::Relaxed),
                Err(_) => self.dropped_lines.fetch_add(lines, Ordering::Relaxed),
            };
            let spare_len = spare.len() as u64;
            self.pending_bytes.fetch_sub(spare_len, Ordering::Relaxed);
            // A burst's buffer is not kept: back to a small one.
            if spare.capacity() > 256 << 10 {
                spare = Vec::new();
            }
            spare.clear();

            queue = self.lock();
            queue.writing = 0;
            queue.done += spare_len;
            self.written.notify_all();
        }
    }
}

static SINK: OnceLock<Arc<Sink>> = OnceLock::new();

/// Starts the process's sink writing to stderr (once; later calls return the
/// same sink). `None` when its thread cannot be started.
pub fn install() -> Option<&'static Arc<Sink>> {
    if let Some(sink) = SINK.get() {
        return Some(sink);
    }
    let sink = start(Sink::new(MAX_PENDING_BYTES, GATHER), Box::new(std::io::stderr())).ok()?;
    Some(SINK.get_or_init(|| sink))
}

fn start(sink: Arc<Sink>, mut out: Box<dyn std::io::Write + Send>) -> std::io::Result<Arc<Sink>> {
    let writer = Arc::clone(&sink);
    std::thread::Builder::new().name("turnstile-log".into()).spawn(move || writer.run(&mut *out))?;
    Ok(sink)
}

/// The process's sink's counters (zero before [`install`]).
pub fn stats() -> SinkStats {
    SINK.get().map(|sink| sink.stats()).unwrap_or_default()
}

/// Writes what waits in the process's sink (see [`Sink::flush`]).
pub fn flush(timeout: Duration) {
    if let Some(sink) = SINK.get() {
        sink.flush(timeout);
    }
}

/// What the log formatter writes each line into: one `write` per event,
/// the whole line, taken into the sink.
#[derive(Clone, Copy)]
pub struct LineWriter(&'static Sink);

impl LineWriter {
    pub fn new(sink: &'static Arc<Sink>) -> Self {
        Self(sink)
    }
}

impl std::io::Write for LineWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.0.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LineWriter {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output that records what reaches it, and can be made to block.
    #[derive(Clone, Default)]
    struct Output {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<AtomicU64>,
        gate: Arc<Mutex<()>>,
    }

    impl std::io::Write for Output {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _open = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.bytes.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Output {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.bytes.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
        }
    }

    fn sink(max_pending: usize, gather: Duration) -> (Arc<Sink>, Output) {
        let out = Output::default();
        let sink = start(Sink::new(max_pending, gather), Box::new(out.clone())).expect("writer thread");
        (sink, out)
    }

    /// Waits until the writer is in a write (held at the output's gate).
    fn wait_writing(sink: &Sink) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while sink.lock().writing == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(sink.lock().writing > 0, "the writer took the first line");
    }

    #[test]
    fn lines_that_keep_coming_leave_in_one_write_in_order() {
        let (sink, out) = sink(1 << 20, Duration::from_millis(200));
        let gate = out.gate.lock().unwrap_or_else(PoisonError::into_inner);
        sink.push(b"first\n");
        wait_writing(&sink);
        for i in 0..500 {
            sink.push(format!("line {i}\n").as_bytes());
        }
        drop(gate);
        assert!(sink.flush(Duration::from_secs(5)));
        let expected: String =
            std::iter::once("first\n".to_owned()).chain((0..500).map(|i| format!("line {i}\n"))).collect();
        assert_eq!(out.text(), expected);
        assert_eq!(out.writes.load(Ordering::Relaxed), 2, "the first line at once, the 500 behind it in one write");
        assert_eq!(sink.stats(), SinkStats { written_lines: 501, dropped_lines: 0, pending_bytes: 0 });
    }

    /// Waits (bounded) until the output ends with `line`.
    fn wait_written(out: &Output, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !out.text().ends_with(line) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(out.text().ends_with(line), "{line:?} written: {:?}", out.text());
    }

    #[test]
    fn a_line_after_a_quiet_spell_goes_out_at_once_and_the_next_within_the_period() {
        let (sink, out) = sink(1 << 20, Duration::from_millis(300));
        sink.push(b"one\n");
        wait_written(&out, "one\n");
        sink.push(b"two\n");
        // The writer just wrote: the second line waits out the period.
        assert_eq!(out.text(), "one\n", "not written before the period ends");
        wait_written(&out, "two\n");
        assert_eq!(out.writes.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_blocked_output_drops_and_counts_lines_and_never_blocks_the_caller() {
        let (sink, out) = sink(64, Duration::ZERO);
        let gate = out.gate.lock().unwrap_or_else(PoisonError::into_inner);
        sink.push(b"first line, being written\n");
        wait_writing(&sink);
        let started = Instant::now();
        for _ in 0..100 {
            sink.push(b"0123456789012345678901234567890\n");
        }
        assert!(started.elapsed() < Duration::from_secs(1), "pushing never waits on the output");
        assert!(!sink.flush(Duration::from_millis(20)), "a blocked output does not hold a flush forever");
        let stats = sink.stats();
        assert_eq!(stats.dropped_lines, 98, "two lines fit in 64 bytes");
        assert_eq!(stats.pending_bytes, 26 + 64);
        drop(gate);
        assert!(sink.flush(Duration::from_secs(5)));
        assert_eq!(sink.stats(), SinkStats { written_lines: 3, dropped_lines: 98, pending_bytes: 0 });
        assert_eq!(out.text().lines().count(), 3);
    }

    #[test]
    fn flush_cuts_the_gathering_short() {
        let (sink, out) = sink(1 << 20, Duration::from_secs(60));
        let gate = out.gate.lock().unwrap_or_else(PoisonError::into_inner);
        sink.push(b"first\n");
        wait_writing(&sink);
        sink.push(b"gathering\n");
        drop(gate);
        let started = Instant::now();
        assert!(sink.flush(Duration::from_secs(5)));
        assert!(started.elapsed() < Duration::from_secs(5), "not the 60 s gathering period");
        assert_eq!(out.text(), "first\ngathering\n");
    }
}
