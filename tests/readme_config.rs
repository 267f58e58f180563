//! The README's configuration reference is the config schema (`idemproxy::config::schema`) rendered:
//! every key with its default and meaning, no key missing, none the proxy does not read.
//! `UPDATE_README=1 cargo test --test readme_config` rewrites the two tables from the schema.

#![allow(clippy::unwrap_used)]

use idemproxy::config::schema::{markdown_table, KEYS, RULE_KEYS};

/// The Markdown table starting with the line `header` in `text`: (start, end) byte offsets.
fn table_span(text: &str, header: &str) -> (usize, usize) {
    let start = text
        .find(header)
        .unwrap_or_else(|| panic!("README has no table headed {header:?}"));
    let len = text[start..]
        .split_inclusive('\n')
        .take_while(|l| l.starts_with('|'))
        .map(str::len)
        .sum::<usize>();
    (start, start + len)
}

#[test]
fn the_readme_configuration_reference_is_the_schema() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let mut text = std::fs::read_to_string(path).unwrap();
    let tables = [
        ("| key | default | meaning |", markdown_table("key", KEYS)),
        (
            "| rule | default | meaning |",
            markdown_table("rule", RULE_KEYS),
        ),
    ];
    let update = std::env::var_os("UPDATE_README").is_some();
    for (header, want) in tables {
        let (start, end) = table_span(&text, header);
        if update {
            text.replace_range(start..end, &want);
            continue;
        }
        let got = &text[start..end];
        if got != want {
            let missing: Vec<_> = want.lines().filter(|l| !got.contains(l)).collect();
            let extra: Vec<_> = got.lines().filter(|l| !want.contains(l)).collect();
            panic!(
                "README's table {header:?} differs from config::schema \
                 (UPDATE_README=1 cargo test --test readme_config rewrites it)\n\
                 rows the schema has and the README lacks:\n{}\n\
                 rows the README has and the schema lacks:\n{}",
                missing.join("\n"),
                extra.join("\n")
            );
        }
    }
    if update {
        std::fs::write(path, text).unwrap();
    }
}
