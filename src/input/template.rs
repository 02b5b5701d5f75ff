//! `input.template`: the user message rendered from a record's columns with
//! a sandboxed minijinja template (no file or network access; strict
//! undefined values), compiled once per job.

use crate::{Error, Result};
use serde_json::{Map, Value};
use std::sync::Arc;

/// A compiled user-message template and the columns it reads.
#[derive(Clone)]
pub struct UserTemplate {
    env: Arc<minijinja::Environment<'static>>,
    columns: Vec<String>,
}

impl std::fmt::Debug for UserTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserTemplate")
            .field("columns", &self.columns)
            .finish()
    }
}

const NAME: &str = "input.template";

impl UserTemplate {
    /// Compiles the template; a syntax error names the key and the line.
    pub fn compile(source: &str) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| Error::Config(format!("{NAME} does not compile: {e}")))?;
        let tmpl = env.get_template(NAME).expect("just added");
        let globals: Vec<&str> = env.globals().map(|(n, _)| n).collect();
        let mut columns: Vec<String> = tmpl
            .undeclared_variables(false)
            .into_iter()
            .filter(|v| !globals.contains(&v.as_str()))
            .collect();
        columns.sort();
        Ok(Self {
            env: Arc::new(env),
            columns,
        })
    }

    /// The input columns the template reads (its top-level variables).
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// The user message of a record; a missing or null column is the
    /// record's error, naming it.
    pub fn render(
        &self,
        id: &str,
        obj: &Map<String, Value>,
    ) -> std::result::Result<String, String> {
        for c in &self.columns {
            match obj.get(c) {
                None => return Err(format!("record {id}: column `{c}` ({NAME}) is missing")),
                Some(Value::Null) => {
                    return Err(format!("record {id}: column `{c}` ({NAME}) is null"))
                }
                Some(_) => {}
            }
        }
        let tmpl = self.env.get_template(NAME).expect("compiled");
        let text = tmpl
            .render(minijinja::Value::from_serialize(obj))
            .map_err(|e| format!("record {id}: {NAME} failed: {e}"))?;
        if text.trim().is_empty() {
            return Err(format!("record {id}: {NAME} rendered an empty message"));
        }
        Ok(text)
    }

    /// Fails naming the first column the template reads that `has` lacks.
    pub fn check_columns(&self, file: &std::path::Path, has: impl Fn(&str) -> bool) -> Result<()> {
        match self.columns.iter().find(|c| !has(c)) {
            Some(c) => Err(Error::Input(format!(
                "{}: {NAME} reads column `{c}`, which the input does not have",
                file.display()
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_template_over_three_columns_renders_exactly() {
        let t = UserTemplate::compile(
            "Q: {{ question }}\nChoices: {{ choices | join(\", \") }}\nTopic: {{ meta.topic | upper }}",
        )
        .unwrap();
        assert_eq!(t.columns(), ["choices", "meta", "question"]);
        let row = obj(
            serde_json::json!({"question": "2+2?", "choices": ["3", "4"], "meta": {"topic": "math"}, "other": 1}),
        );
        assert_eq!(
            t.render("r1", &row).unwrap(),
            "Q: 2+2?\nChoices: 3, 4\nTopic: MATH"
        );
        let null = obj(serde_json::json!({"question": null, "choices": [], "meta": {}}));
        let e = t.render("r2", &null).unwrap_err();
        assert!(
            e.contains("record r2") && e.contains("`question`") && e.contains("null"),
            "{e}"
        );
        let missing = obj(serde_json::json!({"question": "x", "meta": {}}));
        assert!(t.render("r3", &missing).unwrap_err().contains("`choices`"));
    }

    #[test]
    fn a_bad_template_names_the_key() {
        let e = UserTemplate::compile("{{ question ")
            .unwrap_err()
            .to_string();
        assert!(e.contains("input.template does not compile"), "{e}");
    }
}
