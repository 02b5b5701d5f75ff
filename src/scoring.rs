//! Per-record scores against a reference answer: exact match and contains
//! after configurable normalisation, and regex-extracted answer match (the
//! last match of a pattern, e.g. the last number). Scores are 1.0 / 0.0,
//! `None` without a reference.

use crate::config::{Metric, Normalize, ScoringSpec};
use regex::Regex;

/// A compiled scoring configuration.
#[derive(Debug, Clone)]
pub struct Scorer {
    spec: ScoringSpec,
    regex: Option<Regex>,
}

/// One record's scores, in the order of the job's metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scores {
    /// (metric, score) pairs; `None` when the record has no reference.
    pub values: Vec<(Metric, Option<f64>)>,
    /// What `regex_match` extracted from the completion.
    pub extracted: Option<String>,
}

impl Scorer {
    /// Compiles the job's scoring (the regex is checked at config time).
    pub fn new(spec: &ScoringSpec) -> Self {
        let regex = spec
            .metrics
            .contains(&Metric::RegexMatch)
            .then(|| Regex::new(&spec.regex).expect("validated at config time"));
        Self {
            spec: spec.clone(),
            regex,
        }
    }

    /// The metrics scored.
    pub fn metrics(&self) -> &[Metric] {
        &self.spec.metrics
    }

    /// Applies the configured normalisations.
    pub fn normalize(&self, s: &str) -> String {
        let mut t = s.to_string();
        for n in &self.spec.normalize {
            t = match n {
                Normalize::Lowercase => t.to_lowercase(),
                Normalize::StripPunctuation => {
                    t.chars().filter(|c| !c.is_ascii_punctuation()).collect()
                }
                Normalize::CollapseWhitespace => t.split_whitespace().collect::<Vec<_>>().join(" "),
                Normalize::Strip => t.trim().to_string(),
            };
        }
        t
    }

    /// The last match of the pattern (its first group when it has one).
    pub fn extract(&self, s: &str) -> Option<String> {
        let re = self.regex.as_ref()?;
        re.captures_iter(s).last().map(|c| {
            c.get(1)
                .or_else(|| c.get(0))
                .map_or(String::new(), |m| m.as_str().to_string())
        })
    }

    /// Scores a completion against an optional reference.
    pub fn score(&self, completion: &str, reference: Option<&str>) -> Scores {
        let extracted = self.extract(completion);
        let values = self
            .spec
            .metrics
            .iter()
            .map(|&m| {
                let v = reference.map(|r| {
                    let hit = match m {
                        Metric::ExactMatch => self.normalize(completion) == self.normalize(r),
                        Metric::Contains => self.normalize(completion).contains(&self.normalize(r)),
                        Metric::RegexMatch => {
                            let want = self.extract(r).unwrap_or_else(|| r.trim().to_string());
                            extracted.as_deref() == Some(want.as_str())
                        }
                    };
                    if hit {
                        1.0
                    } else {
                        0.0
                    }
                });
                (m, v)
            })
            .collect();
        Scores { values, extracted }
    }
}

/// Sum of log-softmax (computed in f64) of `tokens[i]` under the logits of
/// position `i - 1`, for `i` in `start..tokens.len()`; and the count.
pub fn loglikelihood(logits: &[Vec<f32>], tokens: &[u32], start: usize) -> (f64, usize) {
    let mut sum = 0.0;
    let mut n = 0;
    for i in start.max(1)..tokens.len() {
        sum += token_logprob(&logits[i - 1], tokens[i]);
        n += 1;
    }
    (sum, n)
}

/// The log-probability of `token` under one logits row (log-softmax in f64).
pub fn token_logprob(row: &[f32], token: u32) -> f64 {
    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = mx + row.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln();
    row[token as usize] as f64 - lse
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scorer_with(metrics: Vec<Metric>, normalize: Vec<Normalize>) -> Scorer {
        Scorer::new(&ScoringSpec {
            loglikelihood: false,
            continuation_column: "continuation".into(),
            reference_column: "reference".into(),
            metrics,
            normalize,
            regex: r"(-?\d+(?:\.\d+)?)".into(),
        })
    }

    fn scorer(metrics: Vec<Metric>) -> Scorer {
        let n = vec![
            Normalize::Lowercase,
            Normalize::StripPunctuation,
            Normalize::CollapseWhitespace,
        ];
        scorer_with(metrics, n)
    }

    /// `strip` is a normalisation like the others: without it (and without
    /// collapse_whitespace) surrounding spaces count (engine v2 issue, item 8).
    #[test]
    fn strip_can_be_turned_off() {
        let none = scorer_with(vec![Metric::ExactMatch], vec![]);
        assert_eq!(none.normalize(" Paris "), " Paris ");
        assert_eq!(none.score(" Paris ", Some("Paris")).values[0].1, Some(0.0));
        let strip = scorer_with(vec![Metric::ExactMatch], vec![Normalize::Strip]);
        assert_eq!(strip.score(" Paris ", Some("Paris")).values[0].1, Some(1.0));
    }

    #[test]
    fn metrics_follow_their_definitions() {
        let s = scorer(vec![
            Metric::ExactMatch,
            Metric::Contains,
            Metric::RegexMatch,
        ]);
        let v =
            |c: &str, r: Option<&str>| s.score(c, r).values.iter().map(|x| x.1).collect::<Vec<_>>();
        assert_eq!(
            v("  Paris. ", Some("paris")),
            vec![Some(1.0), Some(1.0), Some(0.0)]
        );
        assert_eq!(
            v("The capital is Paris!", Some("Paris")),
            vec![Some(0.0), Some(1.0), Some(0.0)]
        );
        assert_eq!(
            v("12 + 30 = 42", Some("42")),
            vec![Some(0.0), Some(1.0), Some(1.0)]
        );
        assert_eq!(
            v("it is 42 or 43", Some("The answer: 42")),
            vec![Some(0.0), Some(0.0), Some(0.0)]
        );
        assert_eq!(v("anything", None), vec![None, None, None]);
        assert_eq!(
            s.score("x 3.5 then 7", None).extracted.as_deref(),
            Some("7")
        );
    }
}
