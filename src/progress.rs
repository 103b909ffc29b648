//! Progress of long commands as a person sees it: an indicatif bar (bytes,
//! rate, ETA) when stderr is a terminal, otherwise a plain line every 2 s
//! and one at the end ("WHAT: X of Y MiB (P%)…"), so that logs and scripts see
//! it move too. The command feeds it numbers; where they come from (the
//! daemon's pin state, a check's counters) is the command's business.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Where plain lines go: stdout for commands whose output is the progress
/// itself (`pin`), stderr for those whose stdout is a result (`check
/// --json`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Lines {
    Stdout,
    Stderr,
}

/// How often a plain line is printed.
const EVERY: Duration = Duration::from_secs(2);

pub struct Progress {
    what: String,
    bar: Option<indicatif::ProgressBar>,
    lines: Lines,
    last_line: Option<Instant>,
    /// The last plain line printed: the end does not print it twice.
    last_text: Option<String>,
}

impl Progress {
    /// A bar on a terminal, plain lines to `lines` otherwise.
    pub fn new(what: &str, lines: Lines) -> Self {
        Self::with_terminal(what, lines, std::io::stderr().is_terminal())
    }

    fn with_terminal(what: &str, lines: Lines, tty: bool) -> Self {
        let bar = tty.then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(what.to_string());
            b
        });
        Progress {
            what: what.to_string(),
            bar,
            lines,
            last_line: None,
            last_text: None,
        }
    }

    /// `done` of `total` bytes; `extra` ends the plain line (", 3 files").
    pub fn update(&mut self, done: u64, total: u64, extra: &str) {
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(done);
            return;
        }
        if self.last_line.is_none_or(|t| t.elapsed() >= EVERY) {
            self.print(line(&self.what, done, total, extra));
            self.last_line = Some(Instant::now());
        }
    }

    /// The work is done: the bar goes (the command prints its result);
    /// without one, a last plain line (however recent the one before)
    /// says where it ended.
    pub fn finish_with(&mut self, done: u64, total: u64, extra: &str) {
        match &self.bar {
            Some(b) => b.finish_and_clear(),
            None => {
                if let Some(l) = self.end_line(done, total, extra) {
                    self.print(l);
                }
            }
        }
    }

    /// The last plain line, unless it is the one just printed (a check
    /// that took less than a line's interval would say its end twice).
    fn end_line(&self, done: u64, total: u64, extra: &str) -> Option<String> {
        let l = line(&self.what, done, total, extra);
        (self.last_text.as_ref() != Some(&l)).then_some(l)
    }

    /// The work stopped short: the bar stays where it got to.
    pub fn abandon(&self) {
        if let Some(b) = &self.bar {
            b.abandon();
        }
    }

    fn print(&mut self, l: String) {
        match self.lines {
            Lines::Stdout => println!("{l}"),
            Lines::Stderr => eprintln!("{l}"),
        }
        self.last_text = Some(l);
    }
}

/// A plain progress line.
fn line(what: &str, done: u64, total: u64, extra: &str) -> String {
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    let pct = if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    format!(
        "{what}: {:.1} of {:.1} MiB ({pct:.0}%){extra}",
        mib(done),
        mib(total)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_line_gives_mebibytes_and_percent() {
        assert_eq!(
            line("checking", 3 << 20, 12 << 20, ", 7 chunks"),
            "checking: 3.0 of 12.0 MiB (25%), 7 chunks"
        );
        // Nothing to do is all done, not a division by zero.
        assert_eq!(
            line("pinning /a", 0, 0, ""),
            "pinning /a: 0.0 of 0.0 MiB (100%)"
        );
    }

    #[test]
    fn plain_lines_are_spaced() {
        let mut p = Progress::with_terminal("x", Lines::Stderr, false);
        p.update(1, 10, "");
        let first = p.last_line.expect("the first update prints");
        p.update(2, 10, "");
        assert_eq!(p.last_line, Some(first), "no second line within 2 s");
        p.last_line = first.checked_sub(EVERY);
        p.update(3, 10, "");
        assert!(p.last_line.is_some_and(|t| t > first), "one 2 s later");
    }

    #[test]
    fn the_end_is_said_once() {
        let mut p = Progress::with_terminal("x", Lines::Stderr, false);
        p.update(10, 10, "");
        assert_eq!(p.end_line(10, 10, ""), None, "just printed");
        assert_eq!(
            p.end_line(9, 10, "").as_deref(),
            Some("x: 0.0 of 0.0 MiB (90%)")
        );
        p.finish_with(9, 10, "");
        assert_eq!(p.last_text.as_deref(), Some("x: 0.0 of 0.0 MiB (90%)"));
    }
}
