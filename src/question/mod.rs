//! The question of a request, in one place: the text rules that find it in
//! a request's messages (here), its token span in the prompt ([`span`]) and
//! the probe pass that computes its vectors before the document is read
//! ([`probe`]).
//!
//! The question of a request is, in this order:
//! 1. the `question` field of its [`crate::RequestOptions`] (the `qllm`
//!    extension of an OpenAI request);
//! 2. for chat, found in the last user message by [`find_question`];
//! 3. for a plain completion, found the same way in the prompt.
//!
//! Running a probe is this project's extension, not the paper's method:
//! the paper reads the question where it stands in the prompt, so a
//! question after the document steers only the decoding. With
//! `mode = "qllm"`, [`probe::prepare`] runs the question alone, one token
//! generated, its state thrown away, keeping only each layer's question
//! vector. The real request retrieves with it from its first memory block
//! on, unless its question lies within the first `n_init + n_local` tokens,
//! where the hook captures it in line as the paper does.
//!
//! With `question_first` (the default), [`probe::prepare`] first copies a
//! question asked after its document to the start of the prompt
//! ([`text::copy_question_first`]): the document is then read with the
//! question among the sinks, and the question's vectors come from that
//! copy, in line. That rewrites the prompt; the paper's prompts are written
//! that way, its method reads them as they are.

#[cfg(feature = "engine")]
pub mod probe;
pub mod span;
pub mod text;

#[cfg(feature = "engine")]
pub use text::find_question;
pub use text::{question_in_text, Question, QuestionSource, QUESTION_MAX_BYTES};
