//! The internal topics' settings that what they hold depends on, checked on every start:
//! an existing topic whose setting differs (created by hand, by an older tally, or changed
//! since) is altered to it — a changelog or membership topic with `cleanup.policy=delete`
//! would lose state once its retention passes.
//!
//! | topic | setting |
//! |-------|---------|
//! | changelog | `cleanup.policy=compact` |
//! | membership | `cleanup.policy=compact` |
//!
//! Partition counts are not migrated: a changelog must keep its source's (a mismatch is a
//! start-up error, see [`crate::kafka::topics::ensure`]). Retention and the side outputs'
//! settings are the operator's to tune, and left as they are.

use crate::topology::TopicKind;

/// What an internal topic of `kind` must have set, as (key, value).
pub fn required(kind: TopicKind) -> &'static [(&'static str, &'static str)] {
    match kind {
        TopicKind::Changelog { .. } | TopicKind::Members => &[("cleanup.policy", "compact")],
        TopicKind::SideOutput | TopicKind::Results | TopicKind::Table => &[],
    }
}

/// The settings of `required` that `current` (a topic's settings by key) does not have.
pub fn missing<'a>(required: &'a [(&'a str, &'a str)], current: impl Fn(&str) -> Option<String>) -> Vec<(&'a str, &'a str)> {
    required.iter().filter(|(k, v)| current(k).as_deref() != Some(*v)).copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changelog_must_be_compacted() {
        let kind = TopicKind::Changelog { source: 0 };
        assert_eq!(missing(required(kind), |_| Some("delete".into())), vec![("cleanup.policy", "compact")]);
        assert!(missing(required(kind), |_| Some("compact".into())).is_empty());
        assert!(missing(required(TopicKind::SideOutput), |_| None).is_empty());
    }
}
