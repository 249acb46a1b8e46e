// An answer drafted on this machine's GPU: confirmed by the anchor through the reconciler, or
// with draftSize 0 the resonator alone, unverified.

import { draft, ended } from './answer-rules.js';
import { AnswerText } from './chunks.js';
import { addSegment, fullHologram, lastAnswer, load } from './conversation.js';
import { HPIError } from './errors.js';
import { Reconciler } from './reconcile.js';

export async function writeOnGpu(rt, record, maxTokens, chunks) {
  if (rt.mode !== 'gpu') throw new HPIError('this conversation was written on a GPU; the engine is in server mode');
  const gpu = rt.gpu;
  const answer = lastAnswer(record);
  // A verdict may confirm one token past the limit: a session keeps it (its record follows
  // the anchor's), a one-off completion stops at max_tokens as OpenAI's does.
  const answerText = new AnswerText(rt, answer, chunks, record.ephemeral ? maxTokens : Infinity, record.sampling);
  try {
    if (rt.loaded !== record.id) await load(rt, record);
    if (rt.draftSize) {
      await verify(rt, record, answer, maxTokens, answerText);
    } else {
      await draftAlone(rt, record, answer, maxTokens, answerText);
    }
    answerText.finish();
  } catch (e) {
    throw gpu.isLost ? rt.lostError : e;
  } finally {
    await rt.persist(record);
  }
}

/** Draft on the GPU and keep what the anchor confirms. */
async function verify(rt, record, answer, maxTokens, answerText) {
  const r = rt.reconciler = new Reconciler(rt.gpu, record.session, record.sync, {
    anchor: rt.anchor, draftSize: rt.draftSize, maxProvisional: rt.maxProvisional, drift: rt.drift,
    sampling: record.sampling, answer: answer.ids,
    onChange: () => {
      rt.stats.tokensPerSecond = r.stats.generated / Math.max(r.stats.draftSeconds, 1e-3);
      answerText.update(r);
    },
    onConfirmed: async (tokens, sync) => {
      answer.ids.push(...tokens);
      answer.content = rt.content(record, answer.ids);
      answer.ended = ended(rt.gpu, record.sampling, answer.ids);
      record.sync = sync;
      await rt.persist(record);
    },
    onRefresh: async (ready) => {
      rt.onWarning('The anchor holds a different history for this conversation; reloading it from the anchor…');
      record.segments = [];
      await addSegment(rt, record, await fullHologram(rt, record));
      answer.ids = [...ready.tokens];
      answer.content = rt.content(record, answer.ids);
      answer.ended = ended(rt.gpu, record.sampling, answer.ids);
      record.sync = { position: ready.position, chain: ready.chain };
      await rt.persist(record);
    },
  });
  answerText.cancel = () => r.stop();
  await r.run(maxTokens);
}

/** The resonator alone (draftSize 0): nothing is verified (tests and benchmarks). */
async function draftAlone(rt, record, answer, maxTokens, answerText) {
  const t0 = performance.now();
  await draft(rt.gpu, maxTokens, record.sampling, [...answer.ids], (batch) => {
    answer.ids.push(...batch);
    answer.content = rt.content(record, answer.ids);
    record.sync.position += batch.length;
    rt.stats.tokensPerSecond = answer.ids.length / ((performance.now() - t0) / 1000);
    answerText.update(null);
  });
  answer.ended = ended(rt.gpu, record.sampling, answer.ids);
}
