// The reconciliation loop: the engine drafts, the anchor confirms, only confirmed tokens stay.
//
// State of one answer: `position` tokens of the conversation are confirmed (their chain hash
// is `chain`, protocol/SPEC.md "Reconciliation frames"); `provisional` are the engine's
// tokens after them. The engine always sits at the end of the provisional tail:
//   engine.position == position - 1 + provisional.length,
//   engine.nextId   == provisional.at(-1) ?? the last confirmed token.
// The engine keeps drafting while a draft is in flight, so a verdict that agrees with the
// tail costs the page nothing; one that disagrees rolls the tail and the engine back.
// When the anchor cannot be reached the engine keeps drafting up to `maxProvisional`
// tokens, retries, and reconciles the tail once the anchor answers again.

import { draft, ended } from './answer-rules.js';
import { FATAL, MAX_DRAFT } from './protocol.js';
import { ProtocolError } from './errors.js';
import { SyncChannel } from './sync.js';

const RETRY_MS = [250, 500, 1000, 2000, 4000];

export class Reconciler {
  /**
   * engine: a Resonator positioned as above. session: {id, token}. sync: {position, chain}.
   * anchor: the AnchorClient of the sync channel. sampling: the session's options (temperature,
   * seed, top_p, …, stop: protocol/SPEC.md "Sampling"); answer: the answer's confirmed ids so far.
   * Hooks: onChange() after any visible change; onConfirmed(tokens, sync) after a verdict,
   * before the page relies on it (the page persists it there); onRefresh(ready) when the
   * anchor's chain is not ours and the page must reload the conversation from the anchor.
   */
  constructor(engine, session, sync, { anchor, draftSize = 16, maxProvisional = 256, sampling = {}, answer = [],
    drift = false, onChange = () => {}, onConfirmed = async () => {}, onRefresh = async () => {} } = {}) {
    // A draft frame carries at most MAX_DRAFT tokens; the anchor refuses a longer one.
    Object.assign(this, { engine, session, anchor, draftSize: Math.min(draftSize, MAX_DRAFT), maxProvisional,
      sampling, drift, onChange, onConfirmed, onRefresh });
    this.answer = [...answer];
    this.position = sync.position;
    this.chain = sync.chain;
    this.last = engine.nextId;  // the last confirmed token: the engine starts with no provisional tail
    this.provisional = [];
    this.channel = null;
    this.online = false;
    this.retries = 0;
    this.inflight = null;  // {tokens} of the draft awaiting its verdict
    this.arrived = null;  // {verdict} or {error} for it
    this.wakeUp = null;
    this.stopped = false;
    this.stats = { passes: 0, drafted: 0, accepted: 0, corrections: 0, reconnects: 0, refreshes: 0,
      bytesSent: 0, bytesReceived: 0, generated: 0, draftSeconds: 0 };
  }

  /** Reconcile until `limit` more tokens are confirmed or the answer ends; returns the confirmed ones. */
  async run(limit) {
    const target = this.target = this.position + limit;
    const finished = () => this.position >= target || this.answerOver;
    this.answerOver = false;
    this.stopped = false;
    this.running = true;
    try {
      await this.connect();
      while (!finished() && !this.stopped) {
        if (this.arrived) {
          await this.settle();
          continue;
        }
        if (this.drift) this.injectDrift();
        if (this.online && !this.inflight && this.provisional.length
            && (this.provisional.length >= this.draftSize || !this.canDraft(target))) {
          this.send();
        }
        if (this.canDraft(target)) {
          await this.draftMore(target);
        } else {
          await new Promise((resolve) => { this.wakeUp = resolve; });
        }
      }
    } finally {
      await this.disconnect();
      this.running = false;
      this.onChange();
    }
  }

  /** Stop after the step in flight (the confirmed tokens so far stay). */
  stop() {
    this.stopped = true;
    this.wake();
  }

  canDraft(target) {
    const ahead = this.online ? Math.min(2 * this.draftSize, this.maxProvisional) : this.maxProvisional;
    return !ended(this.engine, this.sampling, [...this.answer, ...this.provisional])
      && this.position + this.provisional.length < target
      && this.provisional.length < ahead;
  }

  async draftMore(target) {
    const room = Math.min(target - this.position - this.provisional.length, this.engine.opts.batch,
      this.maxProvisional - this.provisional.length);
    const t0 = performance.now();
    const ids = await draft(this.engine, room, this.sampling, [...this.answer, ...this.provisional]);
    this.stats.generated += ids.length;
    this.stats.draftSeconds += (performance.now() - t0) / 1000;
    this.provisional.push(...ids);
    this.onChange();
  }

  // Test switch: the second provisional token after each verdict is made wrong, and the
  // engine continues from it, as a page whose state drifted would.
  injectDrift() {
    if (this.drifted || this.inflight || this.provisional.length < 2) return;
    const wrong = (this.provisional[1] + 1) % this.engine.cfg.V;
    this.provisional.length = 2;
    this.provisional[1] = wrong;
    this.engine.rewind(this.position + 1, wrong);
    this.drifted = true;
  }

  // A verdict confirms the accepted tokens and one of the anchor's own: a draft stops short of
  // the target, so an answer runs past its limit by one token at most (a draft is never empty).
  send() {
    const tokens = this.provisional.slice(0, Math.min(this.draftSize, Math.max(1, this.target - this.position - 1)));
    const end = tokens.findIndex((_, i) => ended(this.engine, this.sampling, [...this.answer, ...tokens.slice(0, i + 1)]));
    if (end >= 0) tokens.length = end + 1;
    this.inflight = { tokens };
    this.stats.drafted += tokens.length;
    this.channel.draft(this.position, this.chain, tokens).then(
      (verdict) => { this.arrived = { verdict }; },
      (error) => { this.arrived = { error }; },
    ).finally(() => this.wake());
  }

  async settle() {
    const { verdict, error } = this.arrived;
    this.arrived = null;
    this.inflight = null;
    if (error) {
      if (FATAL.has(error.anchorCode)) throw error;
      console.warn(`sync: ${error.message}`);
      this.online = false;
      this.scheduleReconnect();
      this.onChange();
      return;
    }
    this.stats.passes += 1;
    this.stats.accepted += verdict.accepted;
    if (verdict.type === 'correction') this.stats.corrections += 1;
    const drafted = this.provisional.slice(0, verdict.accepted);
    await this.adopt([...drafted, verdict.token], verdict);
  }

  /** Take `tokens` as confirmed after `position`; keep the provisional tail only where it agrees. */
  async adopt(tokens, { position, chain }) {
    if (position !== this.position + tokens.length) {
      throw new ProtocolError(`the anchor confirmed up to ${position}, the page counted ${this.position + tokens.length}`);
    }
    const p = this.provisional;
    let m = 0;
    while (m < tokens.length && m < p.length && p[m] === tokens[m]) m++;
    if (m === tokens.length) {
      this.provisional = p.slice(m);
    } else {
      if (m < p.length) {
        this.engine.rewind(this.position + m, tokens[m]);
        await this.engine.append(tokens.slice(m + 1));
      } else {
        await this.engine.append(tokens.slice(m));
      }
      this.provisional = [];
    }
    this.position = position;
    this.chain = chain;
    this.last = tokens.at(-1);
    this.drifted = false;
    this.answer.push(...tokens);
    if (ended(this.engine, this.sampling, this.answer)) this.answerOver = true;
    await this.onConfirmed(tokens, { position, chain });
    this.onChange();
  }

  async connect() {
    let ready;
    try {
      ({ channel: this.channel, ready } = await SyncChannel.open(this.session.id, this.session.token, {
        position: this.position, chain: this.chain, temperature: this.sampling.temperature ?? 0,
        seed: this.sampling.seed ?? 0,
      }, { stats: this.stats, onClose: () => this.wake(), anchor: this.anchor }));
    } catch (e) {
      if (FATAL.has(e.anchorCode)) throw e;
      console.warn(`sync: ${e.message}`);
      this.online = false;
      this.scheduleReconnect();
      return;
    }
    if (ready.refresh) {
      this.provisional = [];
      await this.onRefresh(ready);
      this.position = ready.position;
      this.chain = ready.chain;
      this.last = this.engine.nextId;
      this.answer = [...ready.tokens];
      this.answerOver = ended(this.engine, this.sampling, this.answer);
      this.stats.refreshes += 1;
    } else if (ready.tokens.length) {
      await this.adopt(ready.tokens, ready);  // verdicts the page never received
    }
    if (this.connected) this.stats.reconnects += 1;
    this.connected = true;
    this.online = true;
    this.retries = 0;
    this.onChange();
  }

  scheduleReconnect() {
    this.channel?.close();
    this.channel = null;
    const ms = RETRY_MS[Math.min(this.retries++, RETRY_MS.length - 1)];
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      if (this.stopped) return;
      this.reconnecting = this.connect()
        .catch((error) => { this.arrived = { error }; })
        .finally(() => { this.reconnecting = null; this.wake(); });
    }, ms);
  }

  // The provisional tail is dropped, so the next run (or a reload) starts from confirmed state.
  async disconnect() {
    clearTimeout(this.timer);
    await this.reconnecting;
    if (this.inflight) await new Promise((resolve) => { this.wakeUp = resolve; });
    if (this.arrived?.verdict) await this.settle();
    this.arrived = null;
    this.channel?.close();
    this.channel = null;
    this.online = false;
    if (this.provisional.length) {
      this.engine.rewind(this.position - 1, this.last);
      this.provisional = [];
    }
  }

  wake() {
    const w = this.wakeUp;
    this.wakeUp = null;
    w?.();
  }
}
