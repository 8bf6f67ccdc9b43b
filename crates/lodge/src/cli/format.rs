//! Human output: tables, sizes, durations, progress on stderr.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// A table with left-aligned columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (index, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if index + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  "));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// `256M`, `1G`, `1.5G`.
pub fn mib(mib: u64) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{}G", mib / 1024)
    } else if mib >= 1024 {
        format!("{:.1}G", mib as f64 / 1024.0)
    } else {
        format!("{mib}M")
    }
}

/// Bytes in binary units with one decimal.
pub fn bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// A one-line progress indicator on stderr, redrawn in place on a terminal and printed
/// once otherwise.
pub struct Progress {
    start: Instant,
    terminal: bool,
    tick: usize,
    shown: bool,
}

impl Progress {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
            tick: 0,
            shown: false,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Shows `text` (with a spinner and the elapsed time on a terminal).
    pub fn update(&mut self, text: &str) {
        const SPINNER: [char; 4] = ['|', '/', '-', '\\'];
        let mut stderr = std::io::stderr();
        if self.terminal {
            self.tick += 1;
            let _ = write!(
                stderr,
                "\r\x1b[K{} {text} ({}s)",
                SPINNER[self.tick % SPINNER.len()],
                self.start.elapsed().as_secs()
            );
            let _ = stderr.flush();
            self.shown = true;
        } else if !self.shown {
            let _ = writeln!(stderr, "{text}");
            self.shown = true;
        }
    }

    /// Clears the line.
    pub fn finish(&mut self) {
        if self.terminal && self.shown {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_sizes() {
        assert_eq!(mib(256), "256M");
        assert_eq!(mib(2048), "2G");
        assert_eq!(mib(1536), "1.5G");
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(10 << 30), "10.0G");
    }

    #[test]
    fn tables_align_columns() {
        let text = table(
            &["NAME", "STATE"],
            &[
                vec!["web".into(), "running".into()],
                vec!["database".into(), "stopped".into()],
            ],
        );
        assert_eq!(
            text,
            "NAME      STATE\nweb       running\ndatabase  stopped\n"
        );
    }
}
