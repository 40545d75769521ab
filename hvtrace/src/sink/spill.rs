//! The spill file: messages that did not fit in memory while the server
//! was away, kept on disk in order, read back from the front.
//!
//! One message per line: `SEQ SUBJECT BODY` (the body is one line of
//! JSON, the subject has no spaces). Lines are appended at the end and
//! read from a cursor; when the cursor reaches the end the file is
//! emptied, so its size is what is waiting.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::queue::Msg;

/// An append-only file of messages with a read cursor.
#[derive(Debug)]
pub struct Spill {
    path: PathBuf,
    file: Option<File>,
    /// Bytes written.
    written: u64,
    /// Bytes read back.
    read: u64,
    /// Messages written and not read back.
    count: u64,
}

impl Spill {
    /// A spill file at `path`, created on the first message.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            file: None,
            written: 0,
            read: 0,
            count: 0,
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Messages waiting in it.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes waiting in it.
    pub fn bytes(&self) -> u64 {
        self.written - self.read
    }

    fn file(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&self.path)?;
            self.file = Some(f);
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    /// Appends `m` at the end.
    pub fn push(&mut self, m: &Msg) -> io::Result<()> {
        let mut line = format!("{} {} ", m.seq, m.subject).into_bytes();
        line.extend_from_slice(&m.body);
        line.push(b'\n');
        let at = self.written;
        let f = self.file()?;
        f.seek(SeekFrom::Start(at))?;
        f.write_all(&line)?;
        self.written += line.len() as u64;
        self.count += 1;
        Ok(())
    }

    /// Takes the oldest message.
    pub fn pop(&mut self) -> io::Result<Option<Msg>> {
        if self.count == 0 {
            return Ok(None);
        }
        let at = self.read;
        let drained = self.count == 1;
        let f = self.file()?;
        f.seek(SeekFrom::Start(at))?;
        let mut line = Vec::new();
        BufReader::new(&mut *f).read_until(b'\n', &mut line)?;
        if drained {
            // Start the file afresh.
            f.set_len(0)?;
            self.written = 0;
            self.read = 0;
        } else {
            self.read += line.len() as u64;
        }
        self.count -= 1;
        parse_line(&line)
            .map(Some)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "corrupt spill line"))
    }

    /// Removes the file (when nothing waits in it).
    pub fn remove(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A spill line back into its message.
pub fn parse_line(line: &[u8]) -> Option<Msg> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let sp = line.iter().position(|&b| b == b' ')?;
    let seq = std::str::from_utf8(&line[..sp]).ok()?.parse().ok()?;
    let rest = &line[sp + 1..];
    let sp = rest.iter().position(|&b| b == b' ')?;
    let subject = std::str::from_utf8(&rest[..sp]).ok()?.to_string();
    Some(Msg {
        seq,
        subject,
        body: rest[sp + 1..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64) -> Msg {
        Msg {
            seq,
            subject: "hvtrace.vm.syscall".into(),
            body: format!("{{\"seq\":{seq},\"line\":\"a b\\n\"}}").into_bytes(),
        }
    }

    #[test]
    fn messages_come_back_in_order_and_a_drained_file_is_emptied() {
        let dir = std::env::temp_dir().join(format!("hvtrace-spill-test-{}", std::process::id()));
        let path = dir.join("x.spill");
        let mut s = Spill::new(path.clone());
        for i in 1..=3 {
            s.push(&msg(i)).unwrap();
        }
        assert_eq!((s.len(), s.pop().unwrap(), s.len()), (3, Some(msg(1)), 2));
        s.push(&msg(4)).unwrap();
        let rest: Vec<Msg> = std::iter::from_fn(|| s.pop().unwrap()).collect();
        assert_eq!(rest, [msg(2), msg(3), msg(4)]);
        assert_eq!((s.len(), s.bytes()), (0, 0));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        s.remove();
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
