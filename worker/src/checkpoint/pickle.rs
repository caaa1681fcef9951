//! A minimal pickle virtual machine: enough of protocols 2–5 to read what `torch.save` (protocol 2)
//! and `paddle.save`/numpy (protocols 2–5) write, producing a plain [`Value`] tree. Nothing is
//! imported or called: globals, `REDUCE`, `BUILD` and persistent ids are kept as data for the
//! format readers to interpret.
//!
//! This is our own VM rather than `candle_core::pickle`: candle's lacks the protocol-4 opcodes
//! numpy and paddle emit (`FRAME`, `STACK_GLOBAL`, `MEMOIZE`, `SHORT_BINUNICODE`,
//! `SHORT_BINBYTES`, ...), and its errors do not say where the input went wrong.
//!
//! Objects live in an arena while the VM runs, so that in-place mutations (`SETITEMS`, `APPENDS`,
//! `BUILD`) are seen through every memo reference, as in Python. The arena is then unrolled into a
//! tree; shared objects are copied (their bytes only when they really are shared), with limits on
//! depth and total size so hostile input cannot blow the stack or the memory.

mod value;

pub use value::Value;

use anyhow::{anyhow, bail, Result};
use std::collections::HashMap;

/// Parses one pickle from the start of `data` (bytes after `STOP` are ignored). `source` names the
/// input in error messages (e.g. the file path), which also give the byte offset at fault.
pub fn parse(data: &[u8], source: &str) -> Result<Value> {
    let mut vm = Vm {
        data,
        pos: 0,
        arena: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let root = vm
        .run()
        .map_err(|e| anyhow!("{source}: invalid pickle: {e}"))?;
    Unroller::new(vm.arena, root)
        .unroll(root, 0)
        .map_err(|e| anyhow!("{source}: invalid pickle: {e}"))
}

type Id = usize;

/// An object in the VM's arena; containers refer to their items by arena index.
#[derive(Clone)]
enum Node {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Global {
        module: String,
        name: String,
    },
    Reduce {
        callable: Id,
        args: Id,
    },
    Build {
        obj: Id,
        state: Id,
    },
    PersistentId(Id),
    /// Moved out by the unroller.
    Taken,
}

impl Node {
    fn children(&self) -> Vec<Id> {
        match self {
            Node::List(v) | Node::Tuple(v) => v.clone(),
            Node::Dict(d) => d.iter().flat_map(|&(k, v)| [k, v]).collect(),
            Node::Reduce {
                callable: a,
                args: b,
            }
            | Node::Build { obj: a, state: b } => vec![*a, *b],
            Node::PersistentId(a) => vec![*a],
            _ => Vec::new(),
        }
    }
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    arena: Vec<Node>,
    stack: Vec<Id>,
    /// Stack lengths at each open `MARK`.
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
}

/// The largest protocol this VM knows.
const HIGHEST_PROTOCOL: u8 = 5;

impl Vm<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        let start = self.pos;
        match start.checked_add(n) {
            Some(end) if end <= self.data.len() => {
                self.pos = end;
                Ok(&self.data[start..end])
            }
            _ => bail!(
                "truncated input: {what} needs {n} bytes at offset {start}, but only {} remain",
                self.data.len() - start
            ),
        }
    }

    fn take_array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn take_len(&mut self, width: usize, what: &str) -> Result<usize> {
        let len = match width {
            1 => u64::from(self.take_array::<1>(what)?[0]),
            4 => u64::from(u32::from_le_bytes(self.take_array(what)?)),
            _ => u64::from_le_bytes(self.take_array(what)?),
        };
        usize::try_from(len).map_err(|_| anyhow!("{what}: length {len} does not fit in memory"))
    }

    fn take_line(&mut self, what: &str) -> Result<String> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            bail!(
                "truncated input: {what} at offset {} has no terminating newline",
                self.pos
            )
        };
        let line = std::str::from_utf8(&rest[..n])
            .map_err(|_| anyhow!("{what} at offset {} is not valid UTF-8", self.pos))?
            .to_owned();
        self.pos += n + 1;
        Ok(line)
    }

    fn alloc(&mut self, node: Node) -> Id {
        self.arena.push(node);
        self.arena.len() - 1
    }

    fn push(&mut self, node: Node) {
        let id = self.alloc(node);
        self.stack.push(id);
    }

    fn fence(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self, op_at: usize) -> Result<Id> {
        if self.stack.len() <= self.fence() {
            bail!("stack underflow at offset {op_at}");
        }
        self.stack
            .pop()
            .ok_or_else(|| anyhow!("stack underflow at offset {op_at}"))
    }

    fn top(&self, op_at: usize) -> Result<Id> {
        if self.stack.len() <= self.fence() {
            bail!("stack underflow at offset {op_at}");
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| anyhow!("stack underflow at offset {op_at}"))
    }

    fn pop_mark(&mut self, op_at: usize) -> Result<Vec<Id>> {
        let Some(mark) = self.marks.pop() else {
            bail!("no MARK before the opcode at offset {op_at}");
        };
        // `pop` never goes below the fence, so the mark is within the stack.
        Ok(self.stack.split_off(mark.min(self.stack.len())))
    }

    fn memo_get(&self, index: u64, op_at: usize) -> Result<Id> {
        self.memo
            .get(&index)
            .copied()
            .ok_or_else(|| anyhow!("memo entry {index} read at offset {op_at} was never stored"))
    }

    fn memo_put(&mut self, index: u64, op_at: usize) -> Result<()> {
        let top = self.top(op_at)?;
        self.memo.insert(index, top);
        Ok(())
    }

    /// `callable(*args)`, with the few calls the readers need evaluated directly.
    fn reduce(&self, callable: Id, args: Id) -> Node {
        if let (Node::Global { module, name }, Node::Tuple(items)) =
            (&self.arena[callable], &self.arena[args])
        {
            match (module.as_str(), name.as_str(), items.as_slice()) {
                // `OrderedDict()`: torch state dicts and backward hooks; items follow via SETITEMS.
                ("collections", "OrderedDict", []) => return Node::Dict(Vec::new()),
                // Protocol < 3 pickles empty `bytes` as `bytes()`, and a bytearray as
                // `bytearray(bytes)`.
                ("builtins" | "__builtin__", "bytes" | "bytearray", []) => {
                    return Node::Bytes(Vec::new())
                }
                ("builtins" | "__builtin__", "bytearray", [inner]) => {
                    if let Node::Bytes(b) = &self.arena[*inner] {
                        return Node::Bytes(b.clone());
                    }
                }
                // Protocol < 3 pickles `bytes` as `_codecs.encode(latin1_text, 'latin1')`.
                ("_codecs", "encode", [text, encoding]) => {
                    if let (Node::Str(text), Node::Str(encoding)) =
                        (&self.arena[*text], &self.arena[*encoding])
                    {
                        if encoding == "latin1" || encoding == "latin-1" {
                            let bytes: Option<Vec<u8>> = text
                                .chars()
                                .map(|c| u8::try_from(u32::from(c)).ok())
                                .collect();
                            if let Some(bytes) = bytes {
                                return Node::Bytes(bytes);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        Node::Reduce { callable, args }
    }

    /// Runs to `STOP` and returns the arena index of the result.
    fn run(&mut self) -> Result<Id> {
        loop {
            let at = self.pos;
            let [op] = self.take_array::<1>("opcode")?;
            match op {
                0x80 => {
                    // PROTO
                    let [v] = self.take_array::<1>("PROTO")?;
                    if v > HIGHEST_PROTOCOL {
                        bail!("unsupported pickle protocol {v} at offset {at}");
                    }
                }
                0x95 => {
                    // FRAME: a framing hint only.
                    self.take(8, "FRAME")?;
                }
                b'.' => {
                    // STOP
                    return self.pop(at);
                }
                b'c' => {
                    // GLOBAL
                    let module = self.take_line("GLOBAL module")?;
                    let name = self.take_line("GLOBAL name")?;
                    self.push(Node::Global { module, name });
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop(at)?;
                    let module = self.pop(at)?;
                    match (&self.arena[module], &self.arena[name]) {
                        (Node::Str(m), Node::Str(n)) => {
                            let node = Node::Global {
                                module: m.clone(),
                                name: n.clone(),
                            };
                            self.push(node);
                        }
                        _ => bail!("STACK_GLOBAL at offset {at} needs two strings"),
                    }
                }
                b'X' | 0x8c | 0x8d => {
                    // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
                    let width = match op {
                        0x8c => 1,
                        b'X' => 4,
                        _ => 8,
                    };
                    let len = self.take_len(width, "string length")?;
                    let bytes = self.take(len, "string")?;
                    let s = String::from_utf8(bytes.to_vec())
                        .map_err(|_| anyhow!("string at offset {at} is not valid UTF-8"))?;
                    self.push(Node::Str(s));
                }
                b'C' | b'B' | 0x8e | 0x96 => {
                    // SHORT_BINBYTES, BINBYTES, BINBYTES8, BYTEARRAY8
                    let width = match op {
                        b'C' => 1,
                        b'B' => 4,
                        _ => 8,
                    };
                    let len = self.take_len(width, "bytes length")?;
                    let bytes = self.take(len, "bytes")?.to_vec();
                    self.push(Node::Bytes(bytes));
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.take_array("BININT")?);
                    self.push(Node::Int(v.into()));
                }
                b'K' => {
                    let [v] = self.take_array::<1>("BININT1")?;
                    self.push(Node::Int(v.into()));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take_array("BININT2")?);
                    self.push(Node::Int(v.into()));
                }
                0x8a | 0x8b => {
                    // LONG1, LONG4: little-endian two's complement of the given length.
                    let width = if op == 0x8a { 1 } else { 4 };
                    let len = self.take_len(width, "LONG length")?;
                    let bytes = self.take(len, "LONG")?;
                    let v = long_from_le(bytes)
                        .ok_or_else(|| anyhow!("integer at offset {at} does not fit in 64 bits"))?;
                    self.push(Node::Int(v));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take_array("BINFLOAT")?);
                    self.push(Node::Float(v));
                }
                b'N' => self.push(Node::None),
                0x88 => self.push(Node::Bool(true)),
                0x89 => self.push(Node::Bool(false)),
                b'}' => self.push(Node::Dict(Vec::new())),
                b']' => self.push(Node::List(Vec::new())),
                b')' => self.push(Node::Tuple(Vec::new())),
                b'(' => self.marks.push(self.stack.len()),
                b'd' => {
                    // DICT
                    let items = self.pop_mark(at)?;
                    if items.len() % 2 != 0 {
                        bail!("DICT at offset {at} has an odd number of items");
                    }
                    let pairs = items.chunks_exact(2).map(|p| (p[0], p[1])).collect();
                    self.push(Node::Dict(pairs));
                }
                b'l' => {
                    let items = self.pop_mark(at)?;
                    self.push(Node::List(items));
                }
                b't' => {
                    let items = self.pop_mark(at)?;
                    self.push(Node::Tuple(items));
                }
                0x85..=0x87 => {
                    // TUPLE1, TUPLE2, TUPLE3
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop(at)?);
                    }
                    items.reverse();
                    self.push(Node::Tuple(items));
                }
                b'0' => {
                    // POP
                    self.pop(at)?;
                }
                b'1' => {
                    // POP_MARK
                    self.pop_mark(at)?;
                }
                b'2' => {
                    // DUP
                    let top = self.top(at)?;
                    self.stack.push(top);
                }
                b's' | b'u' => {
                    // SETITEM, SETITEMS
                    let items = if op == b's' {
                        let v = self.pop(at)?;
                        let k = self.pop(at)?;
                        vec![k, v]
                    } else {
                        self.pop_mark(at)?
                    };
                    if items.len() % 2 != 0 {
                        bail!("SETITEMS at offset {at} has an odd number of items");
                    }
                    let target = self.top(at)?;
                    let Node::Dict(dict) = &mut self.arena[target] else {
                        bail!("SETITEM(S) at offset {at} on something that is not a dict");
                    };
                    dict.extend(items.chunks_exact(2).map(|p| (p[0], p[1])));
                }
                b'a' | b'e' => {
                    // APPEND, APPENDS
                    let items = if op == b'a' {
                        vec![self.pop(at)?]
                    } else {
                        self.pop_mark(at)?
                    };
                    let target = self.top(at)?;
                    let Node::List(list) = &mut self.arena[target] else {
                        bail!("APPEND(S) at offset {at} on something that is not a list");
                    };
                    list.extend(items);
                }
                b'q' => {
                    let [i] = self.take_array::<1>("BINPUT")?;
                    self.memo_put(i.into(), at)?;
                }
                b'r' => {
                    let i = u32::from_le_bytes(self.take_array("LONG_BINPUT")?);
                    self.memo_put(i.into(), at)?;
                }
                0x94 => {
                    // MEMOIZE
                    let i = self.memo.len() as u64;
                    self.memo_put(i, at)?;
                }
                b'h' => {
                    let [i] = self.take_array::<1>("BINGET")?;
                    let id = self.memo_get(i.into(), at)?;
                    self.stack.push(id);
                }
                b'j' => {
                    let i = u32::from_le_bytes(self.take_array("LONG_BINGET")?);
                    let id = self.memo_get(i.into(), at)?;
                    self.stack.push(id);
                }
                b'R' | 0x81 => {
                    // REDUCE, NEWOBJ
                    let args = self.pop(at)?;
                    let callable = self.pop(at)?;
                    if !matches!(self.arena[args], Node::Tuple(_)) {
                        bail!("REDUCE/NEWOBJ at offset {at} with arguments that are not a tuple");
                    }
                    let node = self.reduce(callable, args);
                    self.push(node);
                }
                0x92 => {
                    // NEWOBJ_EX
                    let kwargs = self.pop(at)?;
                    let args = self.pop(at)?;
                    let cls = self.pop(at)?;
                    if !matches!(&self.arena[kwargs], Node::Dict(d) if d.is_empty()) {
                        bail!("NEWOBJ_EX at offset {at} with keyword arguments is not supported");
                    }
                    if !matches!(self.arena[args], Node::Tuple(_)) {
                        bail!("NEWOBJ_EX at offset {at} with arguments that are not a tuple");
                    }
                    let node = self.reduce(cls, args);
                    self.push(node);
                }
                b'b' => {
                    // BUILD: replaces the object in place, so memo references see the result.
                    let state = self.pop(at)?;
                    let target = self.top(at)?;
                    let inner = std::mem::replace(&mut self.arena[target], Node::Taken);
                    let obj = self.alloc(inner);
                    self.arena[target] = Node::Build { obj, state };
                }
                b'Q' => {
                    // BINPERSID
                    let pid = self.pop(at)?;
                    self.push(Node::PersistentId(pid));
                }
                b'P' => {
                    // PERSID
                    let line = self.take_line("PERSID")?;
                    let pid = self.alloc(Node::Str(line));
                    self.push(Node::PersistentId(pid));
                }
                0x97 | 0x98 => {
                    bail!("out-of-band buffer (opcode {op:#04x}) at offset {at} is not supported")
                }
                _ => bail!("unknown or unsupported opcode {op:#04x} at offset {at}"),
            }
        }
    }
}

/// Decodes a pickle LONG (little-endian two's complement), if it fits in an `i64`.
fn long_from_le(bytes: &[u8]) -> Option<i64> {
    let Some(&last) = bytes.last() else {
        return Some(0);
    };
    let fill = if last & 0x80 != 0 { 0xff } else { 0 };
    if bytes.len() > 8 {
        // Longer encodings are fine if the extra bytes are only sign extension.
        let (low, high) = bytes.split_at(8);
        if high.iter().any(|&b| b != fill) || (low[7] & 0x80 != 0) != (fill == 0xff) {
            return None;
        }
        return Some(i64::from_le_bytes(low.try_into().ok()?));
    }
    let mut buf = [fill; 8];
    buf[..bytes.len()].copy_from_slice(bytes);
    Some(i64::from_le_bytes(buf))
}

/// Deepest nesting accepted when unrolling (also bounds recursion on cyclic input).
const MAX_DEPTH: usize = 256;

/// Turns the arena into a tree, moving each node out at its last use and copying it before.
struct Unroller {
    arena: Vec<Node>,
    /// References to each node not yet unrolled.
    refs: Vec<usize>,
    /// Nodes the tree may still grow by: shared objects are copied, so the tree can outgrow the
    /// arena, but not without bound.
    budget: usize,
}

impl Unroller {
    fn new(arena: Vec<Node>, root: Id) -> Self {
        let mut refs = vec![0usize; arena.len()];
        for node in &arena {
            for child in node.children() {
                refs[child] += 1;
            }
        }
        refs[root] += 1;
        let budget = arena.len().saturating_mul(16).saturating_add(1 << 20);
        Unroller {
            arena,
            refs,
            budget,
        }
    }

    fn unroll(&mut self, id: Id, depth: usize) -> Result<Value> {
        if depth > MAX_DEPTH {
            bail!("objects nested more than {MAX_DEPTH} deep (or a reference cycle)");
        }
        if self.budget == 0 {
            bail!("shared references expand to too many objects");
        }
        self.budget -= 1;
        self.refs[id] = self.refs[id].saturating_sub(1);
        let node = if self.refs[id] == 0 {
            std::mem::replace(&mut self.arena[id], Node::Taken)
        } else {
            // Still referenced elsewhere: copy it, which adds a reference to each of its items.
            let copy = self.arena[id].clone();
            for child in copy.children() {
                self.refs[child] += 1;
            }
            copy
        };
        let seq = |this: &mut Self, ids: Vec<Id>| -> Result<Vec<Value>> {
            ids.into_iter().map(|c| this.unroll(c, depth + 1)).collect()
        };
        Ok(match node {
            Node::None => Value::None,
            Node::Bool(b) => Value::Bool(b),
            Node::Int(i) => Value::Int(i),
            Node::Float(f) => Value::Float(f),
            Node::Str(s) => Value::Str(s),
            Node::Bytes(b) => Value::Bytes(b),
            Node::List(items) => Value::List(seq(self, items)?),
            Node::Tuple(items) => Value::Tuple(seq(self, items)?),
            Node::Dict(pairs) => {
                let mut out = Vec::with_capacity(pairs.len());
                for (k, v) in pairs {
                    out.push((self.unroll(k, depth + 1)?, self.unroll(v, depth + 1)?));
                }
                Value::Dict(out)
            }
            Node::Global { module, name } => Value::Global { module, name },
            Node::Reduce { callable, args } => Value::Reduce {
                callable: Box::new(self.unroll(callable, depth + 1)?),
                args: Box::new(self.unroll(args, depth + 1)?),
            },
            Node::Build { obj, state } => Value::Build {
                obj: Box::new(self.unroll(obj, depth + 1)?),
                state: Box::new(self.unroll(state, depth + 1)?),
            },
            Node::PersistentId(pid) => Value::PersistentId(Box::new(self.unroll(pid, depth + 1)?)),
            Node::Taken => bail!("internal error: object {id} used after it was moved"),
        })
    }
}

/// A pickle writer for tests: emits the same opcodes as CPython's pickler so that tests can build
/// torch- and numpy-style pickles without Python.
#[cfg(test)]
pub(crate) mod writer;

#[cfg(test)]
mod tests;
