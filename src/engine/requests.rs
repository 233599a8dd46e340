//! What the hook keeps per request, by the id of its `NormalRequest`: the
//! settings its caller registered, the question vectors a probe computed for
//! it, whether the engine started it, and the report of what was done.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;

use super::trace::NeedleReport;
use crate::config::Policy;

/// Settings of one request, registered by its caller before it is sent
/// (see [`crate::question::probe::prepare`]).
#[derive(Debug, Clone)]
pub struct RequestPlan {
    /// The policy it runs with.
    pub policy: Policy,
    /// Tokens of its question (no special tokens), looked up in the prompt.
    pub question: Option<Vec<u32>>,
    /// Set for a probe pass: the request whose question vectors it computes.
    pub probe_for: Option<usize>,
    /// A span to trace (debug): the report then says whether the memory
    /// blocks holding it were retrieved, per layer.
    pub needle: Option<Needle>,
    /// Whether it may resume from a kept prefix, and its own state be kept
    /// for later requests.
    pub reuse: bool,
    /// Whether its question was copied before its document
    /// ([`Policy::question_first`]).
    pub question_copied: bool,
}

/// The span of a prompt to trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Needle {
    /// Its tokens (no special tokens), looked up in the prompt.
    Tokens(Vec<u32>),
    /// Its token positions.
    Span(Range<usize>),
}

/// What the hook did for a request, for its response.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RequestReport {
    /// Policy it ran with.
    pub mode: String,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Of those, the first ones taken over from a kept prefix (an earlier
    /// request's prompt, answer or document) rather than read.
    pub reused_prompt_tokens: usize,
    /// Token span of the question in the prompt, if found.
    pub question_span: Option<(usize, usize)>,
    /// How the question's vectors were obtained: `probe`, `in line`, or
    /// `none`.
    pub question_vectors: &'static str,
    /// Whether the question was copied before the document
    /// ([`Policy::question_first`]).
    pub question_copied: bool,
    /// Tokens held in memory blocks (first layer).
    pub tokens_in_memory: usize,
    /// Memory blocks held (first layer).
    pub blocks: usize,
    /// Blocks retrieved by any layer at the first decode step.
    pub retrieved_blocks: Vec<usize>,
    /// Bytes the hook held for the request at its latest step.
    pub memory_bytes: usize,
    /// Whether the blocks holding the traced span were retrieved, when the
    /// request asked for a trace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub needle: Option<NeedleReport>,
}

/// Question vectors of every layer, from a probe pass.
pub(crate) type ProbedVectors = Vec<Option<Vec<f32>>>;

/// Everything kept per request id, until the request is forgotten.
#[derive(Debug, Default)]
pub(crate) struct RequestRegistry {
    plans: HashMap<usize, RequestPlan>,
    probes: HashMap<usize, ProbedVectors>,
    reports: HashMap<usize, RequestReport>,
    /// Registered requests whose sequences the engine has created.
    started: BTreeSet<usize>,
}

impl RequestRegistry {
    pub fn register(&mut self, id: usize, plan: RequestPlan) {
        self.plans.insert(id, plan);
    }

    pub fn forget(&mut self, id: usize) {
        self.plans.remove(&id);
        self.probes.remove(&id);
        self.reports.remove(&id);
        self.started.remove(&id);
    }

    pub fn plan(&self, id: usize) -> Option<&RequestPlan> {
        self.plans.get(&id)
    }

    pub fn is_registered(&self, id: usize) -> bool {
        self.plans.contains_key(&id)
    }

    /// Marks a registered request as started and returns its plan and the
    /// vectors a probe computed for it.
    pub fn start(&mut self, id: usize) -> Option<(RequestPlan, Option<ProbedVectors>)> {
        let plan = self.plans.get(&id)?.clone();
        self.started.insert(id);
        let probed = self.probes.get(&id).cloned();
        Some((plan, probed))
    }

    pub fn started(&self, id: usize) -> bool {
        self.started.contains(&id)
    }

    /// Keeps a probe's vectors for `target`, if it is still registered: a
    /// late step must not bring back what [`Self::forget`] removed.
    pub fn publish_probe(&mut self, target: usize, vectors: ProbedVectors) {
        if self.plans.contains_key(&target) {
            self.probes.insert(target, vectors);
        }
    }

    /// Keeps a report for a registered request; others (mistral.rs's own
    /// routes) would pile up.
    pub fn publish_report(&mut self, id: usize, report: RequestReport) {
        if self.plans.contains_key(&id) {
            self.reports.insert(id, report);
        }
    }

    pub fn report(&self, id: usize) -> Option<RequestReport> {
        self.reports.get(&id).cloned()
    }

    /// Request ids with anything kept.
    pub fn tracked(&self) -> usize {
        let mut ids: BTreeSet<usize> = self.plans.keys().copied().collect();
        ids.extend(self.probes.keys());
        ids.extend(self.reports.keys());
        ids.extend(self.started.iter());
        ids.len()
    }
}
