//! Structured output: a JSON Schema, regex or Lark grammar compiled by
//! llguidance into a matcher per request, whose token mask limits what the
//! sampler may pick at every step.
//!
//! The token trie comes from `tokenizer.json` through llguidance's own
//! reader (byte-fallback `<0xNN>` tokens, the `▁` space, special tokens
//! kept out of text), so no second `tokenizers` crate is needed. Masks are
//! computed on host threads (rayon) between the step's launch and its
//! sampling, while the GPU runs the forward.

use crate::config::Constraint;
use crate::{Error, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Compiles constraints against one tokenizer (once per distinct
/// constraint; each request gets a clone of the compiled matcher).
pub struct Guides {
    factory: ParserFactory,
    compiled: Mutex<HashMap<Constraint, std::result::Result<Matcher, String>>>,
    vocab: usize,
}

impl std::fmt::Debug for Guides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guides")
            .field("vocab", &self.vocab)
            .finish()
    }
}

impl Guides {
    /// The tokenizer's token bytes, padded to the model's `vocab` (its
    /// logits row length); `eos` are the ids that end a completion.
    pub fn load(tokenizer_json: &Path, vocab: usize, eos: &[u32]) -> Result<Self> {
        let text =
            std::fs::read_to_string(tokenizer_json).map_err(|e| Error::io(tokenizer_json, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            Error::Model(format!("{}: invalid JSON: {e}", tokenizer_json.display()))
        })?;
        let mut tokens = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| {
            Error::Model(format!(
                "{}: cannot build the token trie for constraints: {e}",
                tokenizer_json.display()
            ))
        })?;
        if tokens.len() > vocab {
            return Err(Error::Model(format!(
                "{} has {} tokens, more than the model's vocabulary of {vocab}",
                tokenizer_json.display(),
                tokens.len()
            )));
        }
        tokens.resize(vocab, Vec::new());
        let first_eos = *eos
            .first()
            .ok_or_else(|| Error::Model("no EOS token id".into()))?;
        let trie =
            TokTrie::from(&TokRxInfo::new(vocab as u32, first_eos), &tokens).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| Error::Model(format!("constraint parser factory: {e}")))?;
        factory.quiet();
        Ok(Self {
            factory,
            compiled: Mutex::new(HashMap::new()),
            vocab,
        })
    }

    /// A fresh guide for `c`, or why `c` does not compile (a phrase to put
    /// after the constraint's name).
    pub fn guide(&self, c: &Constraint) -> std::result::Result<Guide, String> {
        let mut cache = self.compiled.lock().expect("guide cache lock");
        let compiled = cache.entry(c.clone()).or_insert_with(|| {
            let grammar = match c {
                Constraint::JsonSchema(s) => {
                    let v = serde_json::from_str(s).map_err(|e| format!("is not JSON: {e}"))?;
                    TopLevelGrammar::from_json_schema(with_layout(v))
                }
                Constraint::Regex(r) => TopLevelGrammar::from_regex(r),
                Constraint::Grammar(g) => TopLevelGrammar::from_lark(g.clone()),
            };
            let m = Matcher::new(self.factory.create_parser(grammar));
            match m.get_error() {
                Some(e) => Err(format!("does not compile: {e}")),
                None => Ok(m),
            }
        });
        let m = compiled.as_ref().map_err(Clone::clone)?;
        Ok(Guide {
            matcher: m.deep_clone(),
            mask: None,
            allowed: None,
            failed: None,
        })
    }

    /// The logits row length the masks cover.
    pub fn vocab(&self) -> usize {
        self.vocab
    }
}

/// Loads [`Guides`] on first use (a job whose records carry no constraint
/// never builds the token trie) and keeps them: an engine builds the trie
/// once and compiles each constraint once across its runs.
pub struct LazyGuides {
    cell: std::sync::OnceLock<std::result::Result<Guides, String>>,
    tokenizer_json: std::path::PathBuf,
    vocab: usize,
    eos: Vec<u32>,
}

impl std::fmt::Debug for LazyGuides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyGuides")
            .field("loaded", &self.cell.get().is_some())
            .finish()
    }
}

impl LazyGuides {
    /// Guides over `tokenizer_json` for logits rows of `vocab`.
    pub fn new(tokenizer_json: &Path, vocab: usize, eos: &[u32]) -> Self {
        Self {
            cell: std::sync::OnceLock::new(),
            tokenizer_json: tokenizer_json.to_path_buf(),
            vocab,
            eos: eos.to_vec(),
        }
    }

    /// The guides, loaded now if not yet.
    pub fn get(&self) -> std::result::Result<&Guides, String> {
        self.cell
            .get_or_init(|| {
                Guides::load(&self.tokenizer_json, self.vocab, &self.eos).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// A guide for `c`.
    pub fn guide(&self, c: &Constraint) -> std::result::Result<Guide, String> {
        self.get()?.guide(c)
    }
}

/// JSON laid out as Python's `json.dumps` does (`", "` and `": "`, no
/// other whitespace) unless the schema's own `x-guidance` options say
/// otherwise: free whitespace lets a model pad a document until it runs out
/// of tokens.
fn with_layout(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": "
            })
        });
    }
    schema
}

/// One request's constraint state.
pub struct Guide {
    matcher: Matcher,
    /// The allowed tokens of the coming step (set before sampling).
    pub mask: Option<SimpleVob>,
    /// The same, one byte per token of the logits row.
    pub allowed: Option<Vec<u8>>,
    /// Why the matcher refused a token (the completion then ends).
    pub failed: Option<String>,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide")
            .field("stopped", &self.matcher.is_stopped())
            .field("failed", &self.failed)
            .finish()
    }
}

impl Guide {
    /// Computes the mask of the coming step.
    pub fn compute_mask(&mut self) {
        match self.matcher.compute_mask_or_eos() {
            Ok(m) => self.mask = Some(m),
            Err(e) => {
                tracing::warn!("the constraint cannot go on, the completion ends: {e}");
                self.failed = Some(e.to_string());
            }
        }
    }

    /// Feeds the sampled token.
    pub fn consume(&mut self, tok: u32) {
        self.mask = None;
        self.allowed = None;
        if self.failed.is_none() {
            if let Err(e) = self.matcher.consume_token(tok) {
                self.failed = Some(e.to_string());
            }
        }
    }

    /// Whether the grammar has ended (its mask allows only EOS) or failed.
    pub fn is_done(&self) -> bool {
        self.failed.is_some() || self.matcher.is_stopped()
    }

    /// Whether the output so far is a complete sentence of the grammar.
    pub fn is_complete(&mut self) -> bool {
        self.failed.is_none() && self.matcher.is_accepting().unwrap_or(false)
    }

    /// A copy in the same state (a forked sample).
    pub fn fork(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            mask: self.mask.clone(),
            allowed: self.allowed.clone(),
            failed: self.failed.clone(),
        }
    }
}

/// A mask as one byte per token (1 = allowed) over `vocab` tokens: the
/// form uploaded to the device (expanded from the mask's 32-bit words).
pub fn mask_bytes(mask: &SimpleVob, vocab: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(vocab + 31);
    for &w in mask.as_slice() {
        out.extend((0..32).map(|b| ((w >> b) & 1) as u8));
    }
    out.resize(vocab, 0);
    out
}

/// Computes the masks of `guides` (and their byte form) in parallel on
/// host threads.
pub fn compute_masks(guides: Vec<&mut Guide>, vocab: usize) {
    use rayon::prelude::*;
    guides.into_par_iter().for_each(|g| {
        g.compute_mask();
        g.allowed = g.mask.as_ref().map(|m| mask_bytes(m, vocab));
    });
}

#[cfg(test)]
mod tests;
