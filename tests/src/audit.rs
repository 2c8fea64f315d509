//! Reading the relay's audit log (`--audit-log`) in tests: every line is
//! one JSON object, and the file may have been rotated (`FILE.1`, …).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// Every line of the audit log at `path` and its rotated files, oldest
/// first; panics on a line that is not a JSON object.
pub fn read_audit(path: &Path) -> Vec<Value> {
    let mut files: Vec<PathBuf> = (1..100)
        .map(|index| PathBuf::from(format!("{}.{index}", path.display())))
        .filter(|file| file.exists())
        .collect();
    files.reverse();
    files.push(path.to_path_buf());
    let mut events = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{} ends in the middle of a line",
            file.display()
        );
        for line in text.lines() {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
            assert!(value.is_object(), "not an object: {line}");
            events.push(value);
        }
    }
    events
}

/// Waits until `found` holds for the audit log's events; returns them.
pub async fn wait_for_audit(
    path: &Path,
    what: &str,
    found: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let events = read_audit(path);
        if found(&events) {
            return events;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "the audit log never showed {what}; it has:\n{}",
                events
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|event| event["event"] == kind)
        .collect()
}
