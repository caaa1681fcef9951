//! A test-only pickle writer.

/// Accumulates opcodes; every method appends one construct.
pub struct PickleWriter {
    /// The pickle so far.
    pub buf: Vec<u8>,
    memo: u32,
}

impl PickleWriter {
    /// Starts a pickle with `PROTO protocol` (and, for protocol 4+, a dummy `FRAME`).
    pub fn new(protocol: u8) -> Self {
        let mut buf = vec![0x80, protocol];
        if protocol >= 4 {
            buf.push(0x95);
            buf.extend_from_slice(&0u64.to_le_bytes());
        }
        PickleWriter { buf, memo: 0 }
    }

    /// A raw opcode.
    pub fn op(&mut self, op: u8) -> &mut Self {
        self.buf.push(op);
        self
    }

    /// `BINPUT` of the next memo index, as protocol-2 pickles do after most objects.
    pub fn put(&mut self) -> &mut Self {
        if self.memo < 256 {
            self.buf.extend_from_slice(&[b'q', self.memo as u8]);
        } else {
            self.buf.push(b'r');
            self.buf.extend_from_slice(&self.memo.to_le_bytes());
        }
        self.memo += 1;
        self
    }

    /// `BINGET`/`LONG_BINGET` of memo index `i`.
    pub fn get(&mut self, i: u32) -> &mut Self {
        if i < 256 {
            self.buf.extend_from_slice(&[b'h', i as u8]);
        } else {
            self.buf.push(b'j');
            self.buf.extend_from_slice(&i.to_le_bytes());
        }
        self
    }

    /// The index the next `put` will use.
    pub fn next_memo(&self) -> u32 {
        self.memo
    }

    /// `GLOBAL module\nname\n` (protocol 2 style).
    pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.buf.push(b'c');
        self.buf
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        self
    }

    /// `SHORT_BINUNICODE module; SHORT_BINUNICODE name; STACK_GLOBAL` (protocol 4 style).
    pub fn stack_global(&mut self, module: &str, name: &str) -> &mut Self {
        self.str(module).str(name).op(0x93)
    }

    /// A `str`, as `SHORT_BINUNICODE` when short and `BINUNICODE` otherwise.
    pub fn str(&mut self, s: &str) -> &mut Self {
        if s.len() < 256 {
            self.buf.extend_from_slice(&[0x8c, s.len() as u8]);
        } else {
            self.buf.push(b'X');
            self.buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
        }
        self.buf.extend_from_slice(s.as_bytes());
        self
    }

    /// A `str` as `BINUNICODE` (what protocol 2 always uses).
    pub fn binunicode(&mut self, s: &str) -> &mut Self {
        self.buf.push(b'X');
        self.buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(s.as_bytes());
        self
    }

    /// `bytes`, as `SHORT_BINBYTES` or `BINBYTES`.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        if b.len() < 256 {
            self.buf.extend_from_slice(&[b'C', b.len() as u8]);
        } else {
            self.buf.push(b'B');
            self.buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
        }
        self.buf.extend_from_slice(b);
        self
    }

    /// An int, with the opcode CPython would choose.
    pub fn int(&mut self, v: i64) -> &mut Self {
        if (0..256).contains(&v) {
            self.buf.extend_from_slice(&[b'K', v as u8]);
        } else if (0..65536).contains(&v) {
            self.buf.push(b'M');
            self.buf.extend_from_slice(&(v as u16).to_le_bytes());
        } else if i32::try_from(v).is_ok() {
            self.buf.push(b'J');
            self.buf.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            self.buf.extend_from_slice(&[0x8a, 8]);
            self.buf.extend_from_slice(&v.to_le_bytes());
        }
        self
    }

    /// `NEWTRUE` / `NEWFALSE`.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.op(if v { 0x88 } else { 0x89 })
    }

    /// A tuple of ints, as CPython writes it (`EMPTY_TUPLE`, `TUPLEn` or `MARK ... TUPLE`).
    pub fn int_tuple(&mut self, items: &[i64]) -> &mut Self {
        if items.is_empty() {
            return self.op(b')');
        }
        if items.len() > 3 {
            self.op(b'(');
        }
        for &i in items {
            self.int(i);
        }
        match items.len() {
            1 => self.op(0x85),
            2 => self.op(0x86),
            3 => self.op(0x87),
            _ => self.op(b't'),
        }
    }

    /// `STOP`, returning the finished pickle.
    pub fn finish(&mut self) -> Vec<u8> {
        self.op(b'.');
        std::mem::take(&mut self.buf)
    }
}
