//! gdb's connection, shared by successive gdbstub sessions.
//!
//! gdbstub ends a session on a packet it cannot parse (a malformed
//! command, a register block of the wrong size, an address wider than 64
//! bits). gdb never sends those, but a hostile or broken client must get an
//! error reply, not a dropped session: the stub answers such a packet with
//! `E16` (EINVAL) and starts a new gdbstub session on the same connection
//! (see `super::serve`). This handle lets each session borrow the one
//! connection, and notes whether gdb turned acknowledgements off.

use std::cell::RefCell;
use std::io;
use std::rc::Rc;

use gdbstub::conn::{Connection, ConnectionExt};

/// The bytes that switch acknowledgements off (`QStartNoAckMode`).
const NO_ACK: &[u8] = b"QStartNoAckMode#";

/// A connection to gdb that several sessions may use in turn.
#[derive(Clone)]
pub struct SharedConn(Rc<RefCell<Inner>>);

struct Inner {
    conn: Box<dyn ConnectionExt<Error = io::Error>>,
    /// The last bytes read, to spot `QStartNoAckMode`.
    tail: Vec<u8>,
    no_ack: bool,
}

impl SharedConn {
    /// Shares `conn`.
    pub fn new(conn: Box<dyn ConnectionExt<Error = io::Error>>) -> Self {
        Self(Rc::new(RefCell::new(Inner {
            conn,
            tail: Vec::new(),
            no_ack: false,
        })))
    }

    /// Answers the packet a session could not handle with `E16`
    /// (acknowledged first, unless gdb turned acknowledgements off).
    pub fn reply_error(&self) -> io::Result<()> {
        let mut inner = self.0.borrow_mut();
        if !inner.no_ack {
            inner.conn.write(b'+')?;
        }
        inner.conn.write_all(b"$E16#ac")?;
        inner.conn.flush()
    }
}

impl Connection for SharedConn {
    type Error = io::Error;

    fn write(&mut self, byte: u8) -> io::Result<()> {
        self.0.borrow_mut().conn.write(byte)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.borrow_mut().conn.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.borrow_mut().conn.flush()
    }
}

impl ConnectionExt for SharedConn {
    fn read(&mut self) -> io::Result<u8> {
        let mut inner = self.0.borrow_mut();
        let byte = inner.conn.read()?;
        inner.tail.push(byte);
        if inner.tail.len() > NO_ACK.len() {
            let extra = inner.tail.len() - NO_ACK.len();
            inner.tail.drain(..extra);
        }
        if inner.tail == NO_ACK {
            inner.no_ack = true;
        }
        Ok(byte)
    }

    fn peek(&mut self) -> io::Result<Option<u8>> {
        self.0.borrow_mut().conn.peek()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection reading from a script and recording what is written.
    struct Script {
        input: std::collections::VecDeque<u8>,
        output: Rc<RefCell<Vec<u8>>>,
    }

    impl Connection for Script {
        type Error = io::Error;
        fn write(&mut self, byte: u8) -> io::Result<()> {
            self.output.borrow_mut().push(byte);
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl ConnectionExt for Script {
        fn read(&mut self) -> io::Result<u8> {
            self.input
                .pop_front()
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))
        }
        fn peek(&mut self) -> io::Result<Option<u8>> {
            Ok(self.input.front().copied())
        }
    }

    fn shared(input: &[u8]) -> (SharedConn, Rc<RefCell<Vec<u8>>>) {
        let output = Rc::new(RefCell::new(Vec::new()));
        let conn = SharedConn::new(Box::new(Script {
            input: input.iter().copied().collect(),
            output: output.clone(),
        }));
        (conn, output)
    }

    #[test]
    fn an_error_reply_is_acknowledged_until_gdb_turns_acks_off() {
        let (mut c, out) = shared(b"$QStartNoAckMode#b0");
        c.reply_error().unwrap();
        assert_eq!(out.borrow().as_slice(), b"+$E16#ac");
        while c.read().is_ok() {}
        out.borrow_mut().clear();
        c.reply_error().unwrap();
        assert_eq!(out.borrow().as_slice(), b"$E16#ac");
    }

    #[test]
    fn the_error_reply_checksum_is_the_protocols() {
        let sum = b"E16".iter().fold(0u8, |a, b| a.wrapping_add(*b));
        assert_eq!(format!("{sum:02x}"), "ac");
    }
}
