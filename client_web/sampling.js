// The token choice with a session's sampling options, on the page's CPU: the same function as
// the anchor's server/sampling.py `choose` (protocol/SPEC.md "Sampling"), in float32 steps.
// sample.wgsl chooses on the GPU when no option beyond temperature and seed is set; with any
// other option the engine reads each step's logits back and chooses here.
// protocol/sampling_vectors.json `choices` pins both against each other.

const f = Math.fround;

/** The options that need this module (not just temperature and seed). */
export function needsLogits(s) {
  return !!s && ((s.top_p ?? 1) < 1 || (s.top_k ?? 0) > 0 || !!s.presence_penalty || !!s.frequency_penalty
    || Object.keys(s.logit_bias ?? {}).length > 0);
}

export function lowbias32(x) {
  x >>>= 0;
  x = (x ^ (x >>> 16)) >>> 0;
  x = Math.imul(x, 0x7feb352d) >>> 0;
  x = (x ^ (x >>> 15)) >>> 0;
  x = Math.imul(x, 0x846ca68b) >>> 0;
  return (x ^ (x >>> 16)) >>> 0;
}

/** U(0, 1) in float32 for one token id: exact, never 0 or 1. */
export function uniform(seed, position, id) {
  const h = lowbias32((lowbias32((lowbias32(seed) + position) >>> 0) + id) >>> 0);
  return f(((h >>> 9) * 2 + 1) / 16777216);
}

/** Logits after the bias, the penalties over `answer` (the answer's tokens so far) and the mask. */
export function adjust(logits, s, answer = [], allowed = null) {
  const scores = Float32Array.from(logits);
  for (const [t, b] of Object.entries(s.logit_bias ?? {})) {
    if (+t < scores.length) scores[+t] = f(scores[+t] + f(b));
  }
  const pp = f(s.presence_penalty ?? 0), fp = f(s.frequency_penalty ?? 0);
  if ((pp || fp) && answer.length) {
    const counts = new Map();
    for (const t of answer) counts.set(t, (counts.get(t) ?? 0) + 1);
    for (const [t, c] of counts) {
      if (t < scores.length) scores[t] = f(scores[t] - f(f(c * fp) + pp));
    }
  }
  if (allowed) {
    for (let i = 0; i < scores.length; i++) if (!allowed[i]) scores[i] = -Infinity;
  }
  return scores;
}

/** Ids kept by top-k then top-p (score descending, id ascending on ties). */
export function nucleus(scaled, topK, topP) {
  let order = Array.from(scaled.keys()).sort((a, b) => (scaled[b] - scaled[a]) || (a - b));
  if (topK) order = order.slice(0, topK);
  if (topP < 1) {
    const top = scaled[order[0]];
    const c = new Float32Array(order.length);
    let sum = 0;
    order.forEach((id, i) => { sum = f(sum + f(Math.exp(f(scaled[id] - top)))); c[i] = sum; });
    const bar = f(f(topP) * sum);
    order = order.slice(0, c.findIndex((v) => v >= bar) + 1);
  }
  return order;
}

/** The next token, as server/sampling.py `choose` makes it. */
export function choose(logits, s, position, answer = [], allowed = null) {
  const scores = adjust(logits, s, answer, allowed);
  const T = s.temperature ?? 0;
  const argmaxOf = (ids, value) => ids.reduce((best, id) => (value(id) > value(best) ? id : best), ids[0]);
  if (T <= 0) return argmaxOf(Array.from(scores.keys()), (i) => scores[i]);
  const scaled = scores.map((v) => f(v / f(T)));
  const noisy = (i) => f(scaled[i] + f(-Math.log(f(-Math.log(uniform(s.seed ?? 0, position, i))))));
  const ids = ((s.top_k ?? 0) > 0 || (s.top_p ?? 1) < 1)
    ? nucleus(scaled, s.top_k ?? 0, s.top_p ?? 1).sort((a, b) => a - b)
    : Array.from(scaled.keys());
  return argmaxOf(ids, noisy);
}

// OpenAI's sampling fields a session takes (server/request_sampling.py SamplingFields; a test
// pins the two lists together). The anchor checks their ranges.
export const SAMPLING_FIELDS = ['temperature', 'seed', 'top_p', 'top_k', 'presence_penalty', 'frequency_penalty',
  'logit_bias', 'stop', 'response_format'];

/** A conversation's sampling from create()'s parameters; any other parameter is refused by name. */
export function samplingOf(params) {
  const unknown = Object.keys(params).filter((k) => !SAMPLING_FIELDS.includes(k));
  if (unknown.length) throw new TypeError(`unsupported parameter${unknown.length > 1 ? 's' : ''}: ${unknown.join(', ')}`);
  const s = { temperature: 0, seed: 0 };
  for (const k of SAMPLING_FIELDS) if (params[k] !== undefined && params[k] !== null) s[k] = params[k];
  return s;
}
