//! The module graph is layered: a top-level module of `src/` uses only modules of lower layers, so
//! there is no import cycle and each layer can be read without the ones above it (ARCHITECTURE.md).
//!
//! Read from the sources: every `crate::NAME` path and every name imported by a `use crate::{...}`
//! group counts as a use of `NAME`; comments (and so doc links) do not.

#![allow(clippy::unwrap_used)]

use std::{collections::BTreeMap, path::Path};

/// Top-level modules by layer, lowest first.
const LAYERS: &[&[&str]] = &[
    &["body", "clock", "key", "metrics", "pem", "telemetry"],
    &["config"],
    &["upstream"],
    &["store"],
    &["proxy"],
    &["server"],
    &["admin"],
    &["app"],
    &["demo", "health"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The source without `//` comments (doc comments included) and string literals.
fn code_of(text: &str) -> String {
    text.lines()
        .map(|l| {
            let l = l.split("//").next().unwrap_or("");
            // Drop string literals (a message may mention `crate::x`).
            let mut out = String::new();
            let mut in_str = false;
            for c in l.chars() {
                if c == '"' {
                    in_str = !in_str;
                } else if !in_str {
                    out.push(c);
                }
            }
            out
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level names one source file uses.
fn uses(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The group's top-level items, split at commas outside nested braces.
            let mut depth = 0usize;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        item.push(c);
                    }
                    '}' if depth == 0 => break,
                    '}' => {
                        depth -= 1;
                        item.push(c);
                    }
                    ',' if depth == 0 => {
                        found.push(first_segment(&item));
                        item.clear();
                    }
                    c => item.push(c),
                }
            }
            found.push(first_segment(&item));
        } else {
            found.push(first_segment(rest));
        }
    }
    found.retain(|n| !n.is_empty());
    found
}

fn first_segment(path: &str) -> String {
    path.trim()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_top_level_module_uses_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut modules = 0;
    let mut wrong: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_owned();
        if module == "main" || module == "lib" {
            continue;
        }
        let Some(layer) = layer_of(&module) else {
            panic!("src/{first}: top-level module `{module}` is in no layer of this test");
        };
        modules += 1;
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        for used in uses(&code) {
            if used == module {
                continue;
            }
            match layer_of(&used) {
                Some(l) if l < layer => {}
                Some(_) => wrong
                    .entry(format!("{} ({module})", rel.display()))
                    .or_default()
                    .push(used),
                // Not a top-level module (a macro path, `crate::` in a string we missed): ignored.
                None => {}
            }
        }
    }
    assert!(modules > 20, "read only {modules} module files");
    assert!(
        wrong.is_empty(),
        "uses of a module at the same or a higher layer: {wrong:#?}"
    );
}

#[test]
fn the_reader_sees_uses_in_paths_and_groups_but_not_in_comments() {
    let code = code_of(
        "use crate::{a::b, c::{d, e}, f};\nlet x = crate::g::h();\n// crate::i\n/// [`crate::j`]\nlet s = \"crate::k\";",
    );
    assert_eq!(uses(&code), ["a", "c", "f", "g"]);
}
