//! The question's text: which part of a request's messages asks it.

#[cfg(feature = "engine")]
use mistralrs_core::RequestMessage;

/// Longest question taken from a message by [`find_question`], in bytes.
/// The hook also keeps at most `n_local` of its tokens.
pub const QUESTION_MAX_BYTES: usize = 600;

/// Where a request's question came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuestionSource {
    /// The `question` field of the request options.
    Explicit,
    /// The final paragraph of the last user message (or of the prompt).
    Last,
    /// The first paragraph of the last user message, a question followed by
    /// a document.
    First,
}

impl std::fmt::Display for QuestionSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QuestionSource::Explicit => "the request's `question` field",
            QuestionSource::Last => "the end of the last user message",
            QuestionSource::First => "the start of the last user message",
        })
    }
}

/// The question found in a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Its text.
    pub text: String,
    /// Where it came from.
    pub source: QuestionSource,
}

/// The question of a request's messages: for chat, in the last user message
/// (system prompts and earlier turns are ignored); for a completion, in the
/// prompt. Within that text, split into paragraphs at blank lines:
/// - the final paragraph, if it contains a `?` or is the only one;
/// - else the first paragraph, if it contains a `?` and is at most
///   [`QUESTION_MAX_BYTES`] long (a question before its document);
/// - else the final paragraph (an instruction such as "Summarise the text.").
///
/// A paragraph longer than [`QUESTION_MAX_BYTES`] is cut to its last
/// sentences within that length. `None` when there is no user text.
#[cfg(feature = "engine")]
pub fn find_question(messages: &RequestMessage) -> Option<Question> {
    let text = match messages {
        RequestMessage::Chat { messages, .. } | RequestMessage::MultimodalChat { messages, .. } => {
            messages
                .iter()
                .rev()
                .find(|m| {
                    m.get("role")
                        .and_then(|r| r.as_ref().left())
                        .is_some_and(|r| r == "user")
                })
                .map(|m| message_text(m.get("content")))?
        }
        RequestMessage::Completion { text, .. } => text.clone(),
        _ => return None,
    };
    question_in_text(&text)
}

/// A question asked within a text's first this many bytes is taken as
/// asked before its document: [`copy_question_first`] leaves it alone.
pub const ASKED_FIRST_BYTES: usize = 2 * QUESTION_MAX_BYTES;

/// What [`copy_question_first`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuestionCopy {
    /// The question was put before the document.
    Copied,
    /// The text already asks it within its first [`ASKED_FIRST_BYTES`].
    AlreadyFirst,
    /// There is no text to put it in: a prompt given as tokens, or no user
    /// message.
    NoText,
}

/// Puts `question` before the document as a paragraph of its own: at the
/// start of the last user message (chat) or of the prompt (completion), the
/// text [`find_question`] reads.
#[cfg(feature = "engine")]
pub fn copy_question_first(messages: &mut RequestMessage, question: &str) -> QuestionCopy {
    let asked_first = |text: &str| {
        text.find(question)
            .is_some_and(|at| at + question.len() <= ASKED_FIRST_BYTES)
    };
    let copy = format!("{question}\n\n");
    match messages {
        RequestMessage::Chat { messages, .. } | RequestMessage::MultimodalChat { messages, .. } => {
            let Some(content) = messages
                .iter_mut()
                .rev()
                .find(|m| {
                    m.get("role")
                        .and_then(|r| r.as_ref().left())
                        .is_some_and(|r| r == "user")
                })
                .and_then(|m| m.get_mut("content"))
            else {
                return QuestionCopy::NoText;
            };
            if asked_first(&message_text(Some(content))) {
                return QuestionCopy::AlreadyFirst;
            }
            match content {
                either::Either::Left(text) => text.insert_str(0, &copy),
                either::Either::Right(parts) => parts.insert(
                    0,
                    indexmap::IndexMap::from([
                        ("type".to_string(), serde_json::Value::from("text")),
                        ("text".to_string(), serde_json::Value::from(question)),
                    ]),
                ),
            }
        }
        RequestMessage::Completion { text, .. } => {
            if asked_first(text) {
                return QuestionCopy::AlreadyFirst;
            }
            text.insert_str(0, &copy);
        }
        _ => return QuestionCopy::NoText,
    }
    QuestionCopy::Copied
}

/// The text of a request's messages (the prompt without its template),
/// messages apart by a blank line, if it is given as text.
#[cfg(feature = "engine")]
pub(crate) fn prompt_text(messages: &RequestMessage) -> Option<String> {
    match messages {
        RequestMessage::Chat { messages, .. } | RequestMessage::MultimodalChat { messages, .. } => {
            Some(
                messages
                    .iter()
                    .map(|m| message_text(m.get("content")))
                    .collect::<Vec<_>>()
                    .join("\n\n"),
            )
        }
        RequestMessage::Completion { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// The text parts of a message's content.
#[cfg(feature = "engine")]
fn message_text(content: Option<&mistralrs_core::MessageContent>) -> String {
    match content {
        None => String::new(),
        Some(either::Either::Left(text)) => text.clone(),
        Some(either::Either::Right(parts)) => parts
            .iter()
            .filter(|part| part.get("type").and_then(|t| t.as_str()) == Some("text"))
            .filter_map(|part| part.get("text").and_then(|t| t.as_str()))
            .collect::<Vec<_>>()
            .join("\n\n"),
    }
}

/// [`find_question`]'s rule on one text.
pub fn question_in_text(text: &str) -> Option<Question> {
    let paragraphs: Vec<&str> = text
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let (&first, &last) = (paragraphs.first()?, paragraphs.last()?);
    let (text, source) = if last.contains('?') || paragraphs.len() == 1 {
        (last, QuestionSource::Last)
    } else if first.contains('?') && first.len() <= QUESTION_MAX_BYTES {
        (first, QuestionSource::First)
    } else {
        (last, QuestionSource::Last)
    };
    Some(Question {
        text: last_sentences(text, QUESTION_MAX_BYTES).to_string(),
        source,
    })
}

/// The longest tail of `text` of at most `max` bytes that starts at a
/// sentence (or, failing that, a word) boundary.
fn last_sentences(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut cut = text.len() - max;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    let tail = &text[cut..];
    let sentence = tail
        .match_indices(['.', '?', '!', '\n'])
        .map(|(i, m)| i + m.len())
        .find(|&i| i < tail.len() && !tail[i..].trim().is_empty());
    let word = tail.find(char::is_whitespace);
    match sentence.or(word) {
        Some(at) => tail[at..].trim_start(),
        None => tail,
    }
}

#[cfg(all(test, feature = "engine"))]
mod tests {
    use indexmap::IndexMap;

    use super::*;

    fn chat(turns: &[(&str, &str)]) -> RequestMessage {
        RequestMessage::Chat {
            messages: turns
                .iter()
                .map(|(role, content)| {
                    IndexMap::from([
                        ("role".to_string(), either::Either::Left(role.to_string())),
                        (
                            "content".to_string(),
                            either::Either::Left(content.to_string()),
                        ),
                    ])
                })
                .collect(),
            enable_thinking: None,
            reasoning_effort: None,
        }
    }

    fn question(messages: &RequestMessage) -> Option<(String, QuestionSource)> {
        find_question(messages).map(|q| (q.text, q.source))
    }

    const DOC: &str = "The grass is green. The sky is blue.\n\nThe pass key is 12345. \
                       Remember it.\n\nThe sun is yellow. Here we go.";

    #[test]
    fn question_last_is_the_final_paragraph() {
        let m = chat(&[("user", &format!("{DOC}\n\nWhat is the pass key?"))]);
        assert_eq!(
            question(&m),
            Some(("What is the pass key?".into(), QuestionSource::Last))
        );
    }

    #[test]
    fn question_first_is_the_first_paragraph() {
        let m = chat(&[("user", &format!("What is the pass key?\n\n{DOC}"))]);
        assert_eq!(
            question(&m),
            Some(("What is the pass key?".into(), QuestionSource::First))
        );
    }

    #[test]
    fn system_prompt_and_earlier_turns_are_ignored() {
        let m = chat(&[
            ("system", "You are helpful. What could go wrong?"),
            ("user", &format!("{DOC}\n\nWho wrote this?")),
            ("assistant", "Nobody knows."),
            ("user", "And what is the pass key?"),
        ]);
        assert_eq!(
            question(&m),
            Some(("And what is the pass key?".into(), QuestionSource::Last))
        );
    }

    #[test]
    fn no_question_mark_takes_the_final_instruction() {
        let m = chat(&[("user", &format!("{DOC}\n\nSummarise the text in one line."))]);
        assert_eq!(
            question(&m),
            Some((
                "Summarise the text in one line.".into(),
                QuestionSource::Last
            ))
        );
    }

    #[test]
    fn no_user_text_gives_no_question() {
        assert_eq!(question(&chat(&[("system", "Be brief.")])), None);
        assert_eq!(question(&chat(&[("user", " \n\n ")])), None);
        assert_eq!(question(&chat(&[])), None);
    }

    #[test]
    fn long_final_paragraph_is_cut_to_its_last_sentences() {
        let filler = "The grass is green. ".repeat(100);
        let m = chat(&[(
            "user",
            &format!("{filler}What is the pass key? Answer briefly."),
        )]);
        let (text, source) = question(&m).unwrap();
        assert_eq!(source, QuestionSource::Last);
        assert!(text.len() <= QUESTION_MAX_BYTES, "{}", text.len());
        assert!(text.starts_with("The grass"), "{text}");
        assert!(
            text.ends_with("What is the pass key? Answer briefly."),
            "{text}"
        );
    }

    #[test]
    fn completions_use_the_prompt() {
        let m = RequestMessage::Completion {
            text: format!("{DOC}\n\nWhat is the pass key? The pass key is"),
            echo_prompt: false,
            best_of: None,
        };
        assert_eq!(
            question(&m).unwrap().0,
            "What is the pass key? The pass key is"
        );
    }

    fn user_text(messages: &RequestMessage, index: usize) -> String {
        match messages {
            RequestMessage::Chat { messages, .. } => message_text(messages[index].get("content")),
            RequestMessage::Completion { text, .. } => text.clone(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_question_is_copied_to_the_start_of_the_last_user_message() {
        let long_doc = DOC.repeat(20);
        assert!(long_doc.len() > ASKED_FIRST_BYTES);
        let asked = format!("{long_doc}\n\nWhat is the pass key?");
        let mut m = chat(&[
            ("system", "Be brief."),
            ("user", &asked),
            ("assistant", "12345."),
            ("user", &asked),
        ]);
        assert_eq!(
            copy_question_first(&mut m, "What is the pass key?"),
            QuestionCopy::Copied
        );
        assert_eq!(
            user_text(&m, 3),
            format!("What is the pass key?\n\n{asked}")
        );
        // Earlier turns and the system prompt are not changed.
        assert_eq!(user_text(&m, 1), asked);
        assert_eq!(user_text(&m, 0), "Be brief.");
        // The copy is now the first paragraph, and the last stays the question.
        assert_eq!(
            question(&m),
            Some(("What is the pass key?".into(), QuestionSource::Last))
        );
        // Copied once only.
        assert_eq!(
            copy_question_first(&mut m, "What is the pass key?"),
            QuestionCopy::AlreadyFirst
        );
    }

    #[test]
    fn a_question_asked_before_a_long_document_is_not_copied_again() {
        let long_doc = "The grass is green. ".repeat(200);
        let mut first = chat(&[(
            "user",
            &format!("Read this.\n\nWhat is the pass key?\n\n{long_doc}\n\nWhat is the pass key?"),
        )]);
        let before = user_text(&first, 0);
        assert_eq!(
            copy_question_first(&mut first, "What is the pass key?"),
            QuestionCopy::AlreadyFirst
        );
        assert_eq!(user_text(&first, 0), before);
        // Asked only after more than `ASKED_FIRST_BYTES` of document: copied.
        let mut last = RequestMessage::Completion {
            text: format!("{long_doc}\n\nWhat is the pass key? The pass key is"),
            echo_prompt: false,
            best_of: None,
        };
        assert!(long_doc.len() > ASKED_FIRST_BYTES);
        assert_eq!(
            copy_question_first(&mut last, "What is the pass key?"),
            QuestionCopy::Copied
        );
        assert!(user_text(&last, 0).starts_with("What is the pass key?\n\nThe grass"));
    }

    #[test]
    fn a_question_is_copied_into_multimodal_text_and_not_into_tokens() {
        let mut m = RequestMessage::MultimodalChat {
            messages: vec![IndexMap::from([
                ("role".to_string(), either::Either::Left("user".to_string())),
                (
                    "content".to_string(),
                    either::Either::Right(vec![IndexMap::from([
                        ("type".to_string(), serde_json::Value::from("text")),
                        ("text".to_string(), serde_json::Value::from(DOC)),
                    ])]),
                ),
            ])],
            images: vec![],
            audios: vec![],
            videos: vec![],
            enable_thinking: None,
            reasoning_effort: None,
        };
        assert_eq!(copy_question_first(&mut m, "Who?"), QuestionCopy::Copied);
        let RequestMessage::MultimodalChat { messages, .. } = &m else {
            unreachable!()
        };
        assert_eq!(
            message_text(messages[0].get("content")),
            format!("Who?\n\n{DOC}")
        );
        let mut tokens = RequestMessage::CompletionTokens(vec![1, 2, 3]);
        assert_eq!(
            copy_question_first(&mut tokens, "Who?"),
            QuestionCopy::NoText
        );
        assert_eq!(
            copy_question_first(&mut chat(&[("system", "Be brief.")]), "Who?"),
            QuestionCopy::NoText
        );
    }
}
