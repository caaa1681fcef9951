//! The worker's top-level modules form layers: no two of them import each other, directly or
//! through others (`model` below `train` below `distributed`, and so on). A cycle makes a
//! module impossible to understand, test or move on its own, so this test names any that
//! appears. Test code (`tests.rs`, `*_tests.rs`, and what follows a file's first
//! `#[cfg(test)]`) may reach across layers and is not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every `crate::<module>` a top-level module's non-test code names, by top-level module.
fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("reading worker/src") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !name.ends_with(".rs") || name == "tests.rs" || name.ends_with("_tests.rs") {
                continue;
            }
            let relative = path.strip_prefix(src).expect("a file under worker/src");
            let first = relative.components().next().expect("a path component");
            let top = first
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            let text = std::fs::read_to_string(&path).expect("reading a source file");
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            let targets = graph.entry(top.clone()).or_default();
            for line in code.lines() {
                let line = line.split("//").next().unwrap_or("");
                for (at, _) in line.match_indices("crate::") {
                    let module: String = line[at + "crate::".len()..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !module.is_empty() && module != top {
                        targets.insert(module);
                    }
                }
            }
        }
    }
    graph
}

/// The modules reachable from `start` (itself excluded unless on a cycle).
fn reachable(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<&str> = graph
        .get(start)
        .map(|t| t.iter().map(String::as_str).collect())
        .unwrap_or_default();
    while let Some(m) = todo.pop() {
        if seen.insert(m.to_string()) {
            if let Some(next) = graph.get(m) {
                todo.extend(next.iter().map(String::as_str));
            }
        }
    }
    seen
}

#[test]
fn no_two_top_level_modules_import_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = imports(&src);
    assert!(
        graph.contains_key("model") && graph.contains_key("train"),
        "the scan found the worker's modules: {:?}",
        graph.keys().collect::<Vec<_>>()
    );
    assert!(
        graph["train"].contains("model"),
        "the scan sees train's imports of model"
    );
    let cycles: Vec<String> = graph
        .keys()
        .filter(|m| reachable(&graph, m).contains(*m))
        .map(|m| {
            let back: Vec<&String> = graph[m]
                .iter()
                .filter(|t| reachable(&graph, t).contains(m))
                .collect();
            format!("{m} -> {back:?} -> ... -> {m}")
        })
        .collect();
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
}
