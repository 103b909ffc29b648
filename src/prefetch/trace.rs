//! The access-trace format of the command-line contract: one JSON object per
//! line, `{"ts_ms", "device", "user", "path", "size"}`. `meshfs trace export`
//! writes it, `meshfs prefetch-eval` and the workload generators read and
//! write it.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};

/// One open of one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceEvent {
    pub ts_ms: u64,
    pub device: String,
    pub user: String,
    pub path: String,
    /// Size of the resource in bytes at the time of the open.
    #[serde(default)]
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("trace line {line}: {msg}")]
    Parse { line: usize, msg: String },
    #[error("reading the trace: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads a whole trace. Blank lines are skipped; anything else that is not a
/// trace event is an error naming its line, so a truncated or foreign file is
/// never half-evaluated in silence.
pub fn read(input: impl BufRead) -> Result<Vec<TraceEvent>, TraceError> {
    let mut events = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let event: TraceEvent = serde_json::from_str(text).map_err(|e| TraceError::Parse {
            line: i + 1,
            msg: e.to_string(),
        })?;
        events.push(event);
    }
    Ok(events)
}

pub fn write(mut out: impl Write, events: &[TraceEvent]) -> std::io::Result<()> {
    for e in events {
        serde_json::to_writer(&mut out, e)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors_name_the_line() {
        let events = vec![
            TraceEvent {
                ts_ms: 1,
                device: "a".into(),
                user: "u".into(),
                path: "/x".into(),
                size: 3,
            },
            TraceEvent {
                ts_ms: 2,
                device: "b".into(),
                user: "u".into(),
                path: "/y".into(),
                size: 0,
            },
        ];
        let mut buf = Vec::new();
        write(&mut buf, &events).unwrap();
        assert_eq!(read(&buf[..]).unwrap(), events);
        let bad = b"{\"ts_ms\":1,\"device\":\"a\",\"user\":\"u\",\"path\":\"/x\"}\n\nnot json\n";
        match read(&bad[..]) {
            Err(TraceError::Parse { line, .. }) => assert_eq!(line, 3),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }
}
