//! What the pickle VM produces: a plain tree of Python values, with the accessors the format
//! readers use.

/// A decoded pickle object.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer that fits in 64 bits.
    Int(i64),
    /// A float.
    Float(f64),
    /// A `str`.
    Str(String),
    /// `bytes` or `bytearray`.
    Bytes(Vec<u8>),
    /// A `list`.
    List(Vec<Value>),
    /// A `tuple`.
    Tuple(Vec<Value>),
    /// A `dict` (also `collections.OrderedDict()`, which the VM builds directly), in insertion
    /// order.
    Dict(Vec<(Value, Value)>),
    /// A reference to `module.name` (a class or function), from `GLOBAL`/`STACK_GLOBAL`.
    Global {
        /// The module path, e.g. `torch._utils`.
        module: String,
        /// The attribute name, e.g. `_rebuild_tensor_v2`.
        name: String,
    },
    /// `callable(*args)`, from `REDUCE`, `NEWOBJ` or `NEWOBJ_EX` (whose keyword arguments must be
    /// empty).
    Reduce {
        /// What would be called.
        callable: Box<Value>,
        /// The argument tuple.
        args: Box<Value>,
    },
    /// `obj.__setstate__(state)`, from `BUILD`.
    Build {
        /// The object being built.
        obj: Box<Value>,
        /// Its state.
        state: Box<Value>,
    },
    /// A persistent id (`BINPERSID`/`PERSID`): a reference to data stored outside the pickle.
    PersistentId(Box<Value>),
}

impl Value {
    /// The string, if this is a `Str`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is an `Int`.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The items, if this is a `Tuple` or a `List`.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(v) | Value::List(v) => Some(v),
            _ => None,
        }
    }

    /// The entries, if this is a `Dict`, or a `Build` of a dict (an `OrderedDict` with attributes,
    /// such as a torch state dict's `_metadata`).
    pub fn as_dict(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(d) => Some(d),
            Value::Build { obj, .. } => match obj.as_ref() {
                Value::Dict(d) => Some(d),
                _ => None,
            },
            _ => None,
        }
    }

    /// Like [`Value::as_dict`], but takes ownership.
    pub fn into_dict(self) -> Result<Vec<(Value, Value)>, Value> {
        match self {
            Value::Dict(d) => Ok(d),
            Value::Build { obj, state } => match *obj {
                Value::Dict(d) => Ok(d),
                obj => Err(Value::Build {
                    obj: Box::new(obj),
                    state,
                }),
            },
            other => Err(other),
        }
    }

    /// The value stored under the string key `key`, if this is a dict holding one.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_dict()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// Whether this is `Global { module, name }`.
    pub fn is_global(&self, module: &str, name: &str) -> bool {
        matches!(self, Value::Global { module: m, name: n } if m == module && n == name)
    }

    /// A short description for error messages, e.g. `int`, `dict`,
    /// `call of torch._utils._rebuild_tensor_v2`.
    pub fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::List(_) => "list".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::Dict(_) => "dict".into(),
            Value::Global { module, name } => format!("global {module}.{name}"),
            Value::Reduce { callable, .. } => match callable.as_ref() {
                Value::Global { module, name } => format!("call of {module}.{name}"),
                other => format!("call of {}", other.describe()),
            },
            Value::Build { obj, .. } => format!("built {}", obj.describe()),
            Value::PersistentId(_) => "persistent id".into(),
        }
    }
}
