//! The usage journal: a request's usage written down, before its answer is computed, in an
//! append-only file of the node's data dir, with one `write` on the request's own thread.
//! A database write there cost a round trip through the database's threads in the middle of
//! the model's forward pass, whose wake-ups preempted the model's threads (measured: 15-20%
//! on a 16-token embedding over gRPC, against a few percent for the file). Like a commit in
//! SQLite's WAL mode with `synchronous = NORMAL`, a record survives a crash of the process
//! (it is in the page cache), not one of the machine.
//!
//! A settlement (the usage went to the outbox, or the request failed) appends a mark. Files
//! are segments: a new one starts when the current one grows past [`SEGMENT_BYTES`], and the
//! oldest are deleted once every reservation they hold is settled (oldest first, so a mark
//! never outlives the segments it could refer to). At start, what earlier runs left without
//! a mark is handed back to be billed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kiln_proto::events::v1::Event;
use prost::Message;

/// A segment this large is closed and a new one started.
const SEGMENT_BYTES: u64 = 1 << 20;
const RESERVED: u8 = 1;
const SETTLED: u8 = 2;

pub(super) struct Journal {
    dir: PathBuf,
    segments: Mutex<Segments>,
}

struct Segments {
    current: File,
    current_seq: u64,
    current_len: u64,
    /// Unsettled reservations by segment (every open segment has an entry, the current too).
    unsettled: BTreeMap<u64, usize>,
    /// The segment of each unsettled reservation.
    segment_of: HashMap<String, u64>,
}

impl Journal {
    /// Opens the journal in `dir`, and returns with it the reservations earlier runs left
    /// unsettled; [`Journal::forget_earlier`] once they are billed.
    pub(super) fn open(dir: &Path) -> io::Result<(Self, Vec<Event>)> {
        std::fs::create_dir_all(dir)?;
        let (earlier, reserved) = read_unsettled(dir)?;
        let current_seq = earlier.last().map_or(1, |seq| seq + 1);
        let mut unsettled: BTreeMap<u64, usize> = earlier.iter().map(|&seq| (seq, 0)).collect();
        unsettled.insert(current_seq, 0);
        let journal = Self {
            dir: dir.to_owned(),
            segments: Mutex::new(Segments {
                current: create(&segment_path(dir, current_seq))?,
                current_seq,
                current_len: 0,
                unsettled,
                segment_of: HashMap::new(),
            }),
        };
        Ok((journal, reserved))
    }

    /// Deletes the segments earlier runs left (their reservations are billed).
    pub(super) fn forget_earlier(&self) {
        let mut segments = self.segments();
        let current = segments.current_seq;
        segments.unsettled.retain(|seq, _| *seq == current);
        for (seq, path) in segments_in(&self.dir).unwrap_or_default() {
            if seq < current {
                remove(&path);
            }
        }
    }

    /// Writes `event` down as reserved; returns once it is in the file.
    pub(super) fn reserve(&self, event: &Event) -> io::Result<()> {
        let mut record = Vec::new();
        push_record(&mut record, RESERVED, &event.encode_to_vec())?;
        let mut segments = self.segments();
        segments.append(&record)?;
        let seq = segments.current_seq;
        *segments.unsettled.entry(seq).or_default() += 1;
        segments.segment_of.insert(event.id.clone(), seq);
        Ok(())
    }

    /// Marks the reservations `ids` settled, starts a new segment when the current one is
    /// full and deletes the oldest segments left with nothing unsettled.
    pub(super) fn settle<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut segments = self.segments();
        let mut marks = Vec::new();
        for id in ids {
            let Some(seq) = segments.segment_of.remove(id) else {
                continue;
            };
            if let Some(n) = segments.unsettled.get_mut(&seq) {
                *n = n.saturating_sub(1);
            }
            // An ID is far shorter than the length field's limit.
            let _ = push_record(&mut marks, SETTLED, id.as_bytes());
        }
        // All the marks in one write. Should it fail, the reservations are billed again after
        // a crash: duplicates the events' IDs let every consumer drop.
        if !marks.is_empty()
            && let Err(e) = segments.append(&marks)
        {
            tracing::warn!("cannot mark usage settled in the journal: {e}");
        }
        if segments.current_len >= SEGMENT_BYTES {
            let next = segments.current_seq + 1;
            match create(&segment_path(&self.dir, next)) {
                Ok(file) => {
                    segments.current = file;
                    segments.current_seq = next;
                    segments.current_len = 0;
                    segments.unsettled.insert(next, 0);
                }
                Err(e) => tracing::warn!("cannot start a usage journal segment: {e}"),
            }
        }
        let current = segments.current_seq;
        while let Some((&seq, &0)) = segments.unsettled.first_key_value() {
            if seq == current {
                break;
            }
            segments.unsettled.remove(&seq);
            remove(&segment_path(&self.dir, seq));
        }
    }

    fn segments(&self) -> std::sync::MutexGuard<'_, Segments> {
        self.segments.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Segments {
    /// Appends whole records in one write: a crash of the process leaves them whole or absent.
    fn append(&mut self, records: &[u8]) -> io::Result<()> {
        self.current.write_all(records)?;
        self.current_len += records.len() as u64;
        Ok(())
    }
}

/// Appends a record of `kind` to `buf`: the kind, the payload's length, the payload.
fn push_record(buf: &mut Vec<u8>, kind: u8, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(io::Error::other)?;
    buf.push(kind);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(payload);
    Ok(())
}

/// Reservations a journal in `dir` holds unsettled (for an operator's or a test's check).
pub fn unsettled_in(dir: &Path) -> io::Result<usize> {
    Ok(read_unsettled(dir)?.1.len())
}

/// The sequence numbers of the segments in `dir`, and the reservations they hold without a
/// mark.
fn read_unsettled(dir: &Path) -> io::Result<(Vec<u64>, Vec<Event>)> {
    let mut seqs = Vec::new();
    let mut reserved = Vec::new();
    let mut settled = HashSet::new();
    for (seq, path) in segments_in(dir)? {
        read_segment(&std::fs::read(path)?, &mut reserved, &mut settled);
        seqs.push(seq);
    }
    reserved.retain(|event: &Event| !settled.contains(&event.id));
    Ok((seqs, reserved))
}

/// The records of one segment. A torn or unreadable tail (a crash mid-append) ends it.
fn read_segment(mut bytes: &[u8], reserved: &mut Vec<Event>, settled: &mut HashSet<String>) {
    while bytes.len() >= 5 {
        let len = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        let Some(payload) = bytes.get(5..5 + len) else {
            break;
        };
        match bytes[0] {
            RESERVED => match Event::decode(payload) {
                Ok(event) => reserved.push(event),
                Err(_) => break,
            },
            SETTLED => match std::str::from_utf8(payload) {
                Ok(id) => drop(settled.insert(id.to_owned())),
                Err(_) => break,
            },
            _ => break,
        }
        bytes = &bytes[5 + len..];
    }
}

/// The segments in `dir`, oldest first.
fn segments_in(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let path = entry?.path();
                let seq = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix("usage-")?.strip_suffix(".journal"))
                    .and_then(|n| n.parse::<u64>().ok());
                if let Some(seq) = seq {
                    found.push((seq, path));
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    found.sort();
    Ok(found)
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("usage-{seq:020}.journal"))
}

fn create(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!("cannot delete a usage journal segment: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> Event {
        Event {
            id: id.into(),
            ..Default::default()
        }
    }

    fn ids(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn what_a_run_left_unsettled_is_handed_back_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, earlier) = Journal::open(dir.path()).unwrap();
        assert!(earlier.is_empty());
        for id in ["a", "b", "c"] {
            journal.reserve(&event(id)).unwrap();
        }
        journal.settle(["b"]);
        drop(journal); // a crash: nothing more is written

        assert_eq!(unsettled_in(dir.path()).unwrap(), 2);
        let (journal, earlier) = Journal::open(dir.path()).unwrap();
        assert_eq!(ids(&earlier), ["a", "c"]);
        // Until they are billed and forgotten, another start would hand them back again.
        journal.forget_earlier();
        drop(journal);
        let (_, earlier) = Journal::open(dir.path()).unwrap();
        assert!(earlier.is_empty(), "{:?}", ids(&earlier));
    }

    #[test]
    fn a_torn_last_record_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path()).unwrap();
        journal.reserve(&event("whole")).unwrap();
        drop(journal);
        let (_, path) = segments_in(dir.path()).unwrap().pop().unwrap();
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[RESERVED, 200, 0, 0, 0, 1, 2]).unwrap();
        let (_, earlier) = Journal::open(dir.path()).unwrap();
        assert_eq!(ids(&earlier), ["whole"]);
    }

    #[test]
    fn full_segments_are_deleted_oldest_first_once_settled() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path()).unwrap();
        let payload = "x".repeat(64 << 10);
        let big = |id: &str| Event {
            id: id.into(),
            resource: payload.clone(),
            ..Default::default()
        };
        // "long" stays unsettled in the first segment while later ones fill and settle.
        journal.reserve(&big("long")).unwrap();
        for i in 0..40 {
            let id = format!("r{i}");
            journal.reserve(&big(&id)).unwrap();
            journal.settle([id.as_str()]);
        }
        let count = || segments_in(dir.path()).unwrap().len();
        assert!(count() >= 3, "{} segments", count());
        journal.settle(["long"]);
        assert_eq!(count(), 1, "only the current segment is left");
        assert_eq!(unsettled_in(dir.path()).unwrap(), 0);
    }
}
