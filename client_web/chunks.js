// The chat.completion.chunk stream of one answer, and the text that goes into it: confirmed
// tokens as `delta.content`, the provisional tail restated in `hpi`.

import { cut, ended, held, stopsOf } from './answer-rules.js';
import { ProtocolError } from './errors.js';

/**
 * The chunks of one answer from its token ids. Only confirmed text goes in `delta.content`
 * (so the deltas add up to the exact answer); the provisional tail is restated whole in every
 * chunk. A character split across tokens waits for its last byte, as the anchor's own stream does;
 * text that could begin a stop text waits until it cannot, so no delta is ever cut later.
 */
export class AnswerText {
  constructor(rt, answer, chunks, limit, sampling = {}) {
    Object.assign(this, { rt, answer, chunks, limit, sampling, stops: stopsOf(sampling) });
    this.base = answer.ids.length;
    this.baseText = this.settled(answer.ids, false).length;
    this.sent = '';
    this.reported = 0;
    this.tail = [];
    this.corrections = 0;
    this.online = null;
  }

  set cancel(stop) { this.chunks.cancel = stop; }

  /** After any change; `r`: the Reconciler (null when nothing is verified). */
  update(r, finish = null) {
    const ids = this.answer.ids.slice(0, this.base + this.limit);
    const mine = ids.slice(this.base);
    const tail = r ? [...r.provisional] : [];
    const confirmed = this.settled(ids, finish).slice(this.baseText);
    if (!confirmed.startsWith(this.sent)) throw new ProtocolError('the confirmed text of the answer changed');
    const tokens = mine.slice(this.reported);
    const corrections = r?.stats.corrections ?? 0;
    let correction = null;
    if (corrections > this.corrections) {
      const now = [...tokens, ...tail];
      let kept = 0;
      while (kept < this.tail.length && this.tail[kept] === now[kept]) kept++;
      correction = { dropped: this.tail.length - kept };
    }
    const online = r ? r.online : null;
    const delta = confirmed.slice(this.sent.length);
    if (!finish && !delta && !tokens.length && !correction && online === this.online && sameIds(tail, this.tail)) return;
    const provisionalText = tail.length ? this.rt.decode([...ids, ...tail]).slice(this.baseText + confirmed.length) : '';
    Object.assign(this, { sent: confirmed, reported: mine.length, tail, corrections, online });
    this.chunks.push(delta, { mode: r ? 'verified' : 'unverified', confirmed: mine.length, tokens,
      provisional: tail, provisional_text: provisionalText, correction, online,
      ...(r ? { stats: { ...r.stats } } : {}) }, finish);
    if (finish) this.chunks.usage = { prompt_tokens: this.answer.start + this.base, completion_tokens: mine.length,
      total_tokens: this.answer.start + this.base + mine.length };
  }

  /** The answer's text that no later token changes (all of it, cut at a stop, when `final`). */
  settled(ids, final) {
    const [text, stopped] = cut(this.rt.decode(ids), this.stops);
    if (final || stopped) return text;
    const sure = stable(text);
    return sure.slice(0, sure.length - held(sure, this.stops));
  }

  finish() {
    const ids = this.answer.ids.slice(0, this.base + this.limit);
    this.update(this.rt.reconciler, ended(this.rt.gpu, this.sampling, ids) ? 'stop' : 'length');
  }
}

/** An async iterable of chat.completion.chunk objects, filled as the answer is written. */
export class ChunkStream {
  constructor(model) {
    this.head = { id: `chatcmpl-${crypto.randomUUID()}`, created: Math.floor(Date.now() / 1000), model };
    this.queue = [];
    this.wake = null;
    this.closed = false;
    this.error = null;
    this.first = true;
    this.usage = undefined;
    this.cancel = () => {};
  }

  push(content, hpi, finish = null) {
    const delta = this.first ? { role: 'assistant', content } : (content || !finish ? { content } : {});
    this.first = false;
    this.queue.push({ ...this.head, object: 'chat.completion.chunk',
      choices: [{ index: 0, delta, finish_reason: finish }], hpi });
    this.signal();
  }

  end(error = null) {
    this.closed = true;
    this.error = error;
    this.signal();
  }

  signal() {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  async* [Symbol.asyncIterator]() {
    try {
      for (;;) {
        if (this.queue.length) {
          yield this.queue.shift();
        } else if (this.closed) {
          if (this.error) throw this.error;
          return;
        } else {
          await new Promise((resolve) => { this.wake = resolve; });
        }
      }
    } finally {
      if (!this.closed) this.cancel();  // the consumer stopped reading: stop writing
    }
  }

  /** The whole answer as one chat.completion. */
  async completion() {
    let content = '', finish = null, mode;
    const tokens = [];
    for await (const chunk of this) {
      content += chunk.choices[0].delta.content || '';
      finish = chunk.choices[0].finish_reason || finish;
      tokens.push(...chunk.hpi.tokens);
      mode = chunk.hpi.mode;
    }
    return { ...this.head, object: 'chat.completion',
      choices: [{ index: 0, message: { role: 'assistant', content, refusal: null }, logprobs: null,
        finish_reason: finish }],
      ...(this.usage ? { usage: this.usage } : {}), hpi: { mode, tokens } };
  }
}

const sameIds = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
// Text that later tokens cannot change: a trailing U+FFFD may be half a character.
const stable = (text) => text.replace(/\uFFFD+$/, '');
