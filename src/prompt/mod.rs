//! Prompting: the model's tokenizer, chat rendering from
//! `tokenizer_config.json`'s `chat_template` (ChatML fallback), stop tokens,
//! and prompt-length validation.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// system | user | assistant
    pub role: String,
    /// Text.
    pub content: String,
}

/// The model card's ChatML, used when the tokenizer config has no template.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Tokenizer plus chat template plus stop ids of one model.
pub struct Prompter {
    tokenizer: tokenizers::Tokenizer,
    /// The chat template, compiled once (as `chat`).
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
    stop_ids: Vec<u32>,
    tokenizer_file: std::path::PathBuf,
}

impl Prompter {
    /// A token's bytes as it stands in text: a byte-fallback token
    /// (`<0x0A>`) is its byte, `▁` a space; a special token its name.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.tokenizer.id_to_token(id) else {
            return Vec::new();
        };
        let hex = piece
            .strip_prefix("<0x")
            .and_then(|h| h.strip_suffix('>'))
            .filter(|h| h.len() == 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(b) => vec![b],
            None => piece.replace('\u{2581}', " ").into_bytes(),
        }
    }

    /// The `tokenizer.json` this prompter was loaded from.
    pub fn tokenizer_file(&self) -> &Path {
        &self.tokenizer_file
    }

    /// Loads `tokenizer.json` (+ `tokenizer_config.json` when present) from a
    /// model directory. `config_eos` are the EOS ids of `config.json`.
    pub fn load(dir: &Path, config_eos: &[u32]) -> Result<Self> {
        let tk_path = dir.join("tokenizer.json");
        if !tk_path.is_file() {
            return Err(Error::Model(format!(
                "{} is missing; runner needs the fast tokenizer file",
                tk_path.display()
            )));
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&tk_path).map_err(|e| {
            Error::Model(format!("{}: unreadable tokenizer ({e})", tk_path.display()))
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            serde_json::from_str(&text)
                .map_err(|e| Error::Prompt(format!("{}: invalid JSON: {e}", cfg_path.display())))?
        } else {
            serde_json::Value::Null
        };
        let token_str = |key: &str, default: &str| -> String {
            match cfg.get(key) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v) => v
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or(default)
                    .to_string(),
                None => default.to_string(),
            }
        };
        let template = cfg
            .get("chat_template")
            .and_then(|t| t.as_str())
            .unwrap_or(CHATML_TEMPLATE)
            .to_string();
        let bos_token = token_str("bos_token", "<s>");
        let eos_token = token_str("eos_token", "<|im_end|>");
        let mut stop_ids: Vec<u32> = config_eos.to_vec();
        for name in [eos_token.as_str(), "<|im_end|>"] {
            match tokenizer.token_to_id(name) {
                Some(id) => stop_ids.push(id),
                None if template.contains(name) => tracing::warn!(
                    "the chat template writes {name} but {} has no such token: it is tokenized as text and does not end a completion",
                    tk_path.display()
                ),
                None => {}
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Self {
            tokenizer,
            env: compile_template(template)?,
            bos_token,
            eos_token,
            stop_ids,
            tokenizer_file: tk_path,
        })
    }

    /// Token ids that end a completion (EOS and `<|im_end|>`).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Renders messages with the chat template and a generation prompt.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Prompt(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| Error::Prompt(format!("chat_template failed to render: {e}")))
    }

    /// Tokenizes rendered text; BOS comes from the tokenizer's post-processor
    /// unless the template already wrote it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let add_special = self.bos_token.is_empty() || !text.starts_with(&self.bos_token);
        let enc = self
            .tokenizer
            .encode(text, add_special)
            .map_err(|e| Error::Prompt(format!("tokenizer failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Builds the message list of a plain-prompt record: the record's
    /// system prompt, else the job's (none when both are empty), then the
    /// user turn.
    pub fn messages(system: Option<&str>, job_system: &str, user: &str) -> Vec<Message> {
        let user = Message {
            role: "user".into(),
            content: user.into(),
        };
        Self::with_system(&[user], system, job_system)
    }

    /// The rule for a record's system prompt: messages that have a system
    /// message keep theirs; otherwise the record's system prompt (the
    /// `system` column), else the job's `generation.system_prompt`, is
    /// prepended (nothing when it is empty).
    pub fn with_system(
        messages: &[Message],
        system: Option<&str>,
        job_system: &str,
    ) -> Vec<Message> {
        let sys = system.unwrap_or(job_system);
        if sys.is_empty() || messages.iter().any(|m| m.role == "system") {
            return messages.to_vec();
        }
        let mut m = Vec::with_capacity(messages.len() + 1);
        m.push(Message {
            role: "system".into(),
            content: sys.into(),
        });
        m.extend_from_slice(messages);
        m
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Prompt(format!("tokenizer failed to decode: {e}")))
    }
}

/// The chat template compiled once, with what HF templates expect of
/// Jinja: Python's string and dict methods (`.strip()`, `.items()`, ...)
/// and `raise_exception(msg)`.
fn compile_template(template: String) -> Result<minijinja::Environment<'static>> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template_owned("chat", template)
        .map_err(|e| Error::Prompt(format!("chat_template does not parse: {e}")))?;
    Ok(env)
}

/// What the engine's stop checks and row builder need of a tokenizer.
pub trait Decoder: Sync {
    /// Completion ids to text, special tokens skipped.
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// Token ids that end a completion.
    fn stop_ids(&self) -> &[u32];
}

impl Decoder for Prompter {
    fn decode(&self, ids: &[u32]) -> Result<String> {
        Prompter::decode(self, ids)
    }
    fn stop_ids(&self) -> &[u32] {
        Prompter::stop_ids(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn a_system_prompt_is_added_only_when_the_messages_have_none() {
        let user = [msg("user", "hi")];
        assert_eq!(
            Prompter::with_system(&user, None, "job"),
            vec![msg("system", "job"), msg("user", "hi")]
        );
        assert_eq!(
            Prompter::with_system(&user, Some("record"), "job"),
            vec![msg("system", "record"), msg("user", "hi")]
        );
        assert_eq!(Prompter::with_system(&user, None, ""), user.to_vec());
        let own = [msg("system", "own"), msg("user", "hi")];
        assert_eq!(
            Prompter::with_system(&own, Some("record"), "job"),
            own.to_vec()
        );
    }
}
