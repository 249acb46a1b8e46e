// What an answer may contain and where it ends, on the page: server/answer_rules.py's rules
// (protocol/SPEC.md "Sampling"). An answer ends at an end-of-turn token or once its text holds
// one of the session's `stop` texts; its text is cut before the first of them.

import { choose, needsLogits } from './sampling.js';

export function stopsOf(sampling) {
  const s = sampling?.stop;
  return s == null ? [] : (typeof s === 'string' ? [s] : [...s]);
}

/** [text before the first stop text, whether there was one]. */
export function cut(text, stops) {
  const at = Math.min(...stops.map((s) => text.indexOf(s)).filter((i) => i >= 0));
  return Number.isFinite(at) ? [text.slice(0, at), true] : [text, false];
}

/** How many characters at the end of `text` could begin a stop text: a stream holds them back. */
export function held(text, stops) {
  let most = 0;
  for (const s of stops) {
    for (let n = Math.min(s.length - 1, text.length); n > most; n--) {
      if (text.endsWith(s.slice(0, n))) { most = n; break; }
    }
  }
  return most;
}

/** The answer's text (end-of-turn tokens left out), not cut. */
export function textOf(engine, answer) {
  return engine.decode(answer.filter((id) => !engine.eos.has(id)));
}

/** Whether the answer (its token ids so far) is over. */
export function ended(engine, sampling, answer) {
  if (answer.length && engine.eos.has(answer.at(-1))) return true;
  const stops = stopsOf(sampling);
  return stops.length > 0 && cut(textOf(engine, answer), stops)[1];
}

/**
 * Draft up to `n` tokens after `answer` with the session's sampling, stopping where the answer
 * ends. With only temperature and seed the GPU chooses (sample.wgsl); with any other option each
 * step's logits come back and the page chooses as the anchor does (sampling.js).
 */
export async function draft(engine, n, sampling, answer, onTokens = null) {
  const { temperature = 0, seed = 0 } = sampling ?? {};
  if (!needsLogits(sampling) && !stopsOf(sampling).length) {
    return engine.generate(n, { temperature, seed, onTokens });
  }
  const out = [];
  while (out.length < n) {
    const [gpu] = await engine.generate(1, { temperature, seed, stopAtEos: false });
    let token = gpu;
    if (needsLogits(sampling)) {
      // The step's logits choose the token at engine.position, as the anchor counts positions.
      token = choose(await engine.readLogits(), sampling, engine.position, [...answer, ...out]);
      if (token !== gpu) engine.rewind(engine.position, token);
    }
    out.push(token);
    onTokens?.([token]);
    if (ended(engine, sampling, [...answer, ...out])) break;
  }
  return out;
}
