//! The guide on the fixture tokenizer (Mistral's: byte fallback, `▁`).

use super::*;

fn tokenizer() -> std::path::PathBuf {
    std::env::var_os("TEST_FIXTURES_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"))
        .join("tokenizer/tokenizer.json")
}

/// Drives a guide by always taking the allowed token that `prefer` ranks
/// first; returns the decoded bytes of the tokens taken.
fn walk(g: &mut Guide, guides: &Guides, prefer: impl Fn(&[u8]) -> i32) -> Vec<u8> {
    let trie = guides.factory.tok_env().tok_trie().clone();
    let mut out = Vec::new();
    for _ in 0..64 {
        g.compute_mask();
        let mask = g.mask.clone().expect("a mask");
        let tok = (0..guides.vocab() as u32)
            .filter(|&t| mask.is_allowed(t))
            .max_by_key(|&t| (prefer(trie.token(t)), std::cmp::Reverse(t)))
            .expect("some token allowed");
        if trie.eos_token() == tok || g.is_done() {
            break;
        }
        out.extend_from_slice(trie.token(tok));
        g.consume(tok);
        if g.is_done() {
            break;
        }
    }
    out
}

#[test]
fn a_json_schema_guide_only_allows_valid_documents_laid_out_compactly() {
    let guides = Guides::load(&tokenizer(), 32002, &[32000]).unwrap();
    let schema = r#"{"type": "object", "properties": {"k": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["k", "n"], "additionalProperties": false}"#;
    let c = Constraint::json_schema(schema).unwrap();
    let mut g = guides.guide(&c).unwrap();
    // Prefer the longest tokens: the walk still yields a valid document.
    let doc = walk(&mut g, &guides, |b| b.len() as i32);
    let text = String::from_utf8(doc).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert!(v["k"] == "yes" || v["k"] == "no", "{text}");
    assert!(v["n"].as_i64().is_some_and(|n| n <= 9), "{text}");
    assert!(g.is_complete(), "{text}");
    assert!(
        text.starts_with("{\"") && !text.contains("  "),
        "compact: {text}"
    );
    // The fork continues independently from the same state.
    let mut g2 = guides.guide(&c).unwrap();
    g2.compute_mask();
    let f = g2.fork();
    assert!(f.mask.is_some() && !f.is_done());
}

#[test]
fn a_regex_guide_and_a_bad_grammar() {
    let guides = Guides::load(&tokenizer(), 32002, &[32000]).unwrap();
    let mut g = guides
        .guide(&Constraint::Regex("ab[0-9]{2}".into()))
        .unwrap();
    let doc = walk(&mut g, &guides, |b| -(b.len() as i32));
    assert_eq!(&doc[..2], b"ab");
    assert_eq!(doc.len(), 4, "{:?}", String::from_utf8_lossy(&doc));
    assert!(doc[2..].iter().all(u8::is_ascii_digit));
    let bad = guides.guide(&Constraint::Grammar("start: nope_rule".into()));
    assert!(bad.unwrap_err().starts_with("does not compile"));
}

#[test]
fn mask_bytes_mark_the_allowed_tokens() {
    let mut v = SimpleVob::alloc(70);
    v.allow_token(3);
    v.allow_token(64);
    let b = mask_bytes(&v, 70);
    assert_eq!(b.iter().filter(|&&x| x == 1).count(), 2);
    assert_eq!((b[3], b[64], b[0]), (1, 1, 0));
}
