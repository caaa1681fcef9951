//! Tests of `pickle`.

use super::writer::PickleWriter;
use super::*;

fn ok(data: &[u8]) -> Value {
    parse(data, "test").unwrap()
}

#[test]
fn scalars_and_containers() {
    let mut w = PickleWriter::new(4);
    w.op(b'}').op(0x94).op(b'(');
    w.str("a").int(-5);
    w.str("b").int(70000);
    w.str("c").int(1 << 40);
    w.str("d")
        .op(b'G')
        .buf
        .extend_from_slice(&1.5f64.to_be_bytes());
    w.str("e").bool(true);
    w.str("f").op(b'N');
    w.str("g").bytes(b"xyz");
    w.str("h").op(b']').int(1).int(2).op(0x86).op(b'a');
    w.str("i")
        .stack_global("torch._utils", "_rebuild_tensor_v2");
    w.op(b'u');
    let v = ok(&w.finish());
    assert_eq!(v.get("a"), Some(&Value::Int(-5)));
    assert_eq!(v.get("b"), Some(&Value::Int(70000)));
    assert_eq!(v.get("c"), Some(&Value::Int(1 << 40)));
    assert_eq!(v.get("d"), Some(&Value::Float(1.5)));
    assert_eq!(v.get("e"), Some(&Value::Bool(true)));
    assert_eq!(v.get("f"), Some(&Value::None));
    assert_eq!(v.get("g"), Some(&Value::Bytes(b"xyz".to_vec())));
    assert_eq!(
        v.get("h"),
        Some(&Value::List(vec![Value::Tuple(vec![
            Value::Int(1),
            Value::Int(2)
        ])]))
    );
    assert!(v
        .get("i")
        .unwrap()
        .is_global("torch._utils", "_rebuild_tensor_v2"));
}

#[test]
fn memo_sees_in_place_mutation() {
    // d = {}; memoize; d['k'] = 1 (after memoizing); then [d, d] via BINGET.
    let mut w = PickleWriter::new(2);
    w.op(b'}').put().str("k").int(1).op(b's').op(b'0');
    w.get(0).get(0).op(0x86);
    let v = ok(&w.finish());
    let d = Value::Dict(vec![(Value::Str("k".into()), Value::Int(1))]);
    assert_eq!(v, Value::Tuple(vec![d.clone(), d]));

    // An object memoized before BUILD is seen built through the memo.
    let mut w = PickleWriter::new(2);
    w.global("m", "C")
        .op(b')')
        .op(b'R')
        .put()
        .int(7)
        .op(b'b')
        .op(b'0');
    w.get(0);
    let v = ok(&w.finish());
    assert!(
        matches!(&v, Value::Build { state, .. } if **state == Value::Int(7)),
        "{v:?}"
    );
}

#[test]
fn ordered_dict_and_latin1_bytes() {
    let mut w = PickleWriter::new(2);
    w.global("collections", "OrderedDict").op(b')').op(b'R');
    w.op(b'(').binunicode("x");
    w.global("_codecs", "encode")
        .binunicode("a\u{ff}")
        .binunicode("latin1")
        .op(0x86)
        .op(b'R');
    w.op(b'u');
    let v = ok(&w.finish());
    assert_eq!(
        v,
        Value::Dict(vec![(
            Value::Str("x".into()),
            Value::Bytes(vec![b'a', 0xff])
        )])
    );
}

#[test]
fn long_decoding() {
    assert_eq!(long_from_le(&[]), Some(0));
    assert_eq!(long_from_le(&[0xff]), Some(-1));
    assert_eq!(long_from_le(&[0x00, 0x80]), Some(-32768));
    assert_eq!(long_from_le(&[0xff, 0x00]), Some(255));
    assert_eq!(long_from_le(&[1, 0, 0, 0, 0, 0, 0, 0, 0]), Some(1));
    assert_eq!(long_from_le(&[0, 0, 0, 0, 0, 0, 0, 0, 1]), None);
    assert_eq!(long_from_le(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0]), None);
}

#[test]
fn errors_name_the_problem() {
    let err = parse(&[0x80, 2, 0xff], "f.pkl").unwrap_err().to_string();
    assert!(
        err.contains("f.pkl") && err.contains("0xff") && err.contains("offset 2"),
        "{err}"
    );
    let err = parse(&[0x80, 4, 0x8c, 10, b'a'], "f.pkl")
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated"), "{err}");
    let err = parse(&[], "f.pkl").unwrap_err().to_string();
    assert!(err.contains("truncated"), "{err}");
    let err = parse(&[b'h', 3, b'.'], "f.pkl").unwrap_err().to_string();
    assert!(err.contains("memo"), "{err}");
    let err = parse(b"(.", "f.pkl").unwrap_err().to_string();
    assert!(err.contains("underflow"), "{err}");
    assert!(parse(&[0x80, 9, b'N', b'.'], "f").is_err());
    assert!(parse(&[b'K', 1, b'K', 2, b's', b'.'], "f").is_err());
}

#[test]
fn cycles_and_blowups_are_errors() {
    // l = []; l.append(l)
    let cyclic = [b']', b'q', 0, b'h', 0, b'a', b'.'];
    assert!(parse(&cyclic, "f")
        .unwrap_err()
        .to_string()
        .contains("cycle"));
    // t0 = (); t_{i+1} = (t_i, t_i) 64 times: 2^64 nodes if copied naively.
    let mut w = PickleWriter::new(2);
    w.op(b')').put();
    for i in 0..64 {
        w.get(i).get(i).op(0x86).put();
    }
    assert!(parse(&w.finish(), "f").is_err());
}

#[test]
fn random_garbage_never_panics() {
    // A small xorshift generator: deterministic, no dependency.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    // Bias towards real opcodes so the VM gets deep into its states.
    let ops = b"\x80\x95c\x93X\x8c\x8dCB\x8e\x96JKM\x8a\x8bGN\x88\x89}])(dlt\x85\x86\x87012suaeqr\x94hjR\x81\x92bQP.";
    for round in 0..20_000 {
        let len = (next() % 64) as usize;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                let r = next();
                if r % 3 == 0 {
                    (r >> 8) as u8
                } else {
                    ops[(r >> 8) as usize % ops.len()]
                }
            })
            .collect();
        let _ = parse(&data, &format!("round {round}"));
    }
}
