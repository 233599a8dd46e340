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
    /// The last user message (or the prompt) as a whole, cut to its last
    /// sentences: it has one paragraph.
    Only,
}

impl std::fmt::Display for QuestionSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QuestionSource::Explicit => "the request's `question` field",
            QuestionSource::Last => "the end of the last user message",
            QuestionSource::First => "the start of the last user message",
            QuestionSource::Only => "the last user message, one paragraph",
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuestionCopy {
    /// The question was put before the document: this text of it (up to
    /// its last `?`, without an answer's start that may follow).
    Copied(String),
    /// The text already asks it within its first [`ASKED_FIRST_BYTES`].
    AlreadyFirst,
    /// There is no text to put it in: a prompt given as tokens, or no user
    /// message.
    NoText,
    /// What was found is no question asked after a text: the tail of a
    /// one-paragraph message without a `?`, or a question asked first.
    NoQuestion,
}

/// Puts `question` before the document as a paragraph of its own: at the
/// start of the last user message (chat) or of the prompt (completion), the
/// text [`find_question`] reads. In a chat, each earlier user message that
/// asks its own question after its text gets the same copy of that question,
/// so that a conversation resent with its next turn begins as the prompt
/// its previous turn was read as (and resumes from its kept state).
#[cfg(feature = "engine")]
pub fn copy_question_first(messages: &mut RequestMessage, question: &Question) -> QuestionCopy {
    let asks = asks_after_its_text(question);
    let question = asked_part(&question.text);
    match messages {
        RequestMessage::Chat { messages, .. } | RequestMessage::MultimodalChat { messages, .. } => {
            let mut users = messages
                .iter_mut()
                .filter(|m| {
                    m.get("role")
                        .and_then(|r| r.as_ref().left())
                        .is_some_and(|r| r == "user")
                })
                .filter_map(|m| m.get_mut("content"))
                .collect::<Vec<_>>();
            let Some(last) = users.pop() else {
                return QuestionCopy::NoText;
            };
            for content in users {
                let text = message_text(Some(content));
                if let Some(own) = question_in_text(&text).filter(asks_after_its_text) {
                    copy_into_content(content, &text, asked_part(&own.text));
                }
            }
            if !asks {
                return QuestionCopy::NoQuestion;
            }
            let text = message_text(Some(last));
            copy_into_content(last, &text, question)
        }
        RequestMessage::Completion { text, .. } => {
            if !asks {
                return QuestionCopy::NoQuestion;
            }
            copy_into_text(text, question)
        }
        _ => QuestionCopy::NoText,
    }
}

/// Whether `question` is one to copy before its text: given in the
/// request, the final paragraph of its message, or (in a message of one
/// paragraph) a sentence that asks (`?`), not a tail of the text.
#[cfg(feature = "engine")]
fn asks_after_its_text(question: &Question) -> bool {
    match question.source {
        QuestionSource::Explicit | QuestionSource::Last => true,
        QuestionSource::Only => question.text.contains('?'),
        QuestionSource::First => false,
    }
}

/// The sentence of `question` that ends at its last `?` (from the line or
/// sentence end before it): a prompt's last paragraph may hold an
/// instruction before it and the start of its answer after it ("... is"),
/// neither of which is the question to ask first.
#[cfg(feature = "engine")]
fn asked_part(question: &str) -> &str {
    let Some(end) = question.rfind('?') else {
        return question;
    };
    let head = &question[..end];
    let start = head
        .char_indices()
        .zip(head.chars().skip(1).map(Some).chain([None]))
        .filter(|&((_, c), next)| {
            c == '\n' || (matches!(c, '.' | '?' | '!') && next.is_some_and(char::is_whitespace))
        })
        .map(|((i, c), _)| i + c.len_utf8())
        .last()
        .unwrap_or(0);
    question[start..=end].trim()
}

/// Whether `text` asks `question` within its first [`ASKED_FIRST_BYTES`].
#[cfg(feature = "engine")]
fn asked_first(text: &str, question: &str) -> bool {
    text.find(question)
        .is_some_and(|at| at + question.len() <= ASKED_FIRST_BYTES)
}

/// [`copy_question_first`] on one plain text.
#[cfg(feature = "engine")]
fn copy_into_text(text: &mut String, question: &str) -> QuestionCopy {
    if asked_first(text, question) {
        return QuestionCopy::AlreadyFirst;
    }
    text.insert_str(0, &format!("{question}\n\n"));
    QuestionCopy::Copied(question.to_string())
}

/// [`copy_question_first`] on one message's `content`, whose text is `text`.
#[cfg(feature = "engine")]
fn copy_into_content(
    content: &mut mistralrs_core::MessageContent,
    text: &str,
    question: &str,
) -> QuestionCopy {
    match content {
        either::Either::Left(own) => copy_into_text(own, question),
        either::Either::Right(parts) => {
            if asked_first(text, question) {
                return QuestionCopy::AlreadyFirst;
            }
            parts.insert(
                0,
                indexmap::IndexMap::from([
                    ("type".to_string(), serde_json::Value::from("text")),
                    ("text".to_string(), serde_json::Value::from(question)),
                ]),
            );
            QuestionCopy::Copied(question.to_string())
        }
    }
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
    let (text, source) = if paragraphs.len() == 1 {
        (last, QuestionSource::Only)
    } else if last.contains('?') {
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
            Some(("And what is the pass key?".into(), QuestionSource::Only))
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
        assert_eq!(source, QuestionSource::Only);
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

    fn asked_last(text: &str) -> Question {
        Question {
            text: text.into(),
            source: QuestionSource::Last,
        }
    }

    #[test]
    fn the_part_copied_is_the_sentence_that_asks() {
        for (paragraph, asked) in [
            (
                "Answer the question using the text above.\nQuestion: Who came in 1901?\nAnswer: In",
                "Question: Who came in 1901?",
            ),
            ("Read it. What is 3.5 times two? It is", "What is 3.5 times two?"),
            ("Is it? Or is it not?", "Or is it not?"),
            ("Summarise the text.", "Summarise the text."),
            ("Où est-il? Il est", "Où est-il?"),
        ] {
            assert_eq!(asked_part(paragraph), asked, "{paragraph:?}");
        }
    }

    #[test]
    fn a_one_paragraph_prompt_is_copied_only_when_it_asks() {
        let text = "The grass is green. ".repeat(100) + "The pass key is";
        let mut m = chat(&[("user", &text)]);
        let found = find_question(&m).unwrap();
        assert_eq!(found.source, QuestionSource::Only);
        assert_eq!(
            copy_question_first(&mut m, &found),
            QuestionCopy::NoQuestion
        );
        assert_eq!(user_text(&m, 0), text);
        // A long paragraph that ends by asking: its asking sentence is copied.
        let asks = "The grass is green. ".repeat(100) + "What is the pass key? It is";
        let mut m = chat(&[("user", &asks)]);
        let found = find_question(&m).unwrap();
        assert_eq!(found.source, QuestionSource::Only);
        assert_eq!(
            copy_question_first(&mut m, &found),
            QuestionCopy::Copied("What is the pass key?".into())
        );
        assert_eq!(user_text(&m, 0), format!("What is the pass key?\n\n{asks}"));
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
            copy_question_first(&mut m, &asked_last("What is the pass key?")),
            QuestionCopy::Copied("What is the pass key?".into())
        );
        assert_eq!(
            user_text(&m, 3),
            format!("What is the pass key?\n\n{asked}")
        );
        // An earlier turn that asked after its text gets its own copy, as
        // when it was the last; the system prompt and answers are unchanged.
        assert_eq!(user_text(&m, 1), user_text(&m, 3));
        assert_eq!(user_text(&m, 0), "Be brief.");
        assert_eq!(user_text(&m, 2), "12345.");
        // The copy is now the first paragraph, and the last stays the question.
        assert_eq!(
            question(&m),
            Some(("What is the pass key?".into(), QuestionSource::Last))
        );
        // Copied once only.
        assert_eq!(
            copy_question_first(&mut m, &asked_last("What is the pass key?")),
            QuestionCopy::AlreadyFirst
        );
    }

    #[test]
    fn earlier_turns_are_copied_when_the_last_asks_alone() {
        let long_doc = DOC.repeat(20);
        let asked = format!("{long_doc}\n\nWhat is the pass key?");
        let follow_up = "And the city? Name it.";
        let mut m = chat(&[
            ("user", &asked),
            ("assistant", "12345."),
            ("user", follow_up),
        ]);
        let found = find_question(&m).unwrap();
        assert_eq!(
            copy_question_first(&mut m, &found),
            QuestionCopy::AlreadyFirst
        );
        // The first turn reads as it did when it was the last.
        assert_eq!(
            user_text(&m, 0),
            format!("What is the pass key?\n\n{asked}")
        );
        assert_eq!(user_text(&m, 2), follow_up);
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
            copy_question_first(&mut first, &asked_last("What is the pass key?")),
            QuestionCopy::AlreadyFirst
        );
        assert_eq!(user_text(&first, 0), before);
        // Asked only after more than `ASKED_FIRST_BYTES` of document: copied.
        // A completion prompt's last paragraph goes on with the answer's
        // start: only the question up to its `?` is copied.
        let mut last = RequestMessage::Completion {
            text: format!("{long_doc}\n\nWhat is the pass key? The pass key is"),
            echo_prompt: false,
            best_of: None,
        };
        assert!(long_doc.len() > ASKED_FIRST_BYTES);
        let found = find_question(&last).unwrap();
        assert_eq!(found.text, "What is the pass key? The pass key is");
        assert_eq!(
            copy_question_first(&mut last, &found),
            QuestionCopy::Copied("What is the pass key?".into())
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
        assert_eq!(
            copy_question_first(&mut m, &asked_last("Who?")),
            QuestionCopy::Copied("Who?".into())
        );
        let RequestMessage::MultimodalChat { messages, .. } = &m else {
            unreachable!()
        };
        assert_eq!(
            message_text(messages[0].get("content")),
            format!("Who?\n\n{DOC}")
        );
        let mut tokens = RequestMessage::CompletionTokens(vec![1, 2, 3]);
        assert_eq!(
            copy_question_first(&mut tokens, &asked_last("Who?")),
            QuestionCopy::NoText
        );
        assert_eq!(
            copy_question_first(&mut chat(&[("system", "Be brief.")]), &asked_last("Who?")),
            QuestionCopy::NoText
        );
    }
}
