//! Progress output shared by every subcommand: `==> step` headers with timings.

use std::time::{Duration, Instant};

/// A step in progress: printed as `==> title` when started, with its duration when finished.
pub struct Step {
    title: String,
    started: Instant,
}

/// Prints `==> title` and starts timing it.
pub fn step(title: impl Into<String>) -> Step {
    let title = title.into();
    println!("==> {title}");
    Step { title, started: Instant::now() }
}

impl Step {
    /// Time since the step started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Prints how long the step took and returns that duration.
    pub fn done(self) -> Duration {
        let elapsed = self.elapsed();
        println!("    {} done in {}", self.title, human(elapsed));
        elapsed
    }
}

/// Prints an indented detail line under the current step.
pub fn info(line: impl AsRef<str>) {
    println!("    {}", line.as_ref());
}

/// Prints an indented warning: something is missing or degraded but the command goes on.
pub fn warn(line: impl AsRef<str>) {
    println!("    warning: {}", line.as_ref());
}

/// A duration the way a person reads it: `850 ms`, `2.31 s`, `3 min 05 s`.
pub fn human(duration: Duration) -> String {
    let secs = duration.as_secs_f64();
    if secs < 1.0 {
        format!("{} ms", duration.as_millis())
    } else if secs < 120.0 {
        format!("{secs:.2} s")
    } else {
        let whole = duration.as_secs();
        format!("{} min {:02} s", whole / 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_millis(850)), "850 ms");
        assert_eq!(human(Duration::from_millis(2310)), "2.31 s");
        assert_eq!(human(Duration::from_secs(185)), "3 min 05 s");
    }
}
