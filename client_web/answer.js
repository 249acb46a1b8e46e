// Answers as OpenAI's create returns them: a chat.completion, or its chunks as they come,
// written on the GPU (answer-gpu.js) or, for a conversation in server mode, by the anchor
// (answer-server.js).

import { writeOnGpu } from './answer-gpu.js';
import { writeOnServer } from './answer-server.js';
import { ChunkStream } from './chunks.js';
import { dropSession, newRecord, readTurn } from './conversation.js';
import { samplingOf } from './sampling.js';

const DEFAULT_MAX_TOKENS = 256;

/** OpenAI's create: the anchor reads `messages` in a session of its own, deleted after the answer. */
export async function complete(rt, { messages, stream = false, model, max_tokens: maxTokens,
  max_completion_tokens: maxCompletionTokens, ...sampling }) {
  if (!Array.isArray(messages) || !messages.length) throw new TypeError('messages: a non-empty array');
  if (model !== undefined && model !== rt.model.model_key && model !== rt.model.anchor_model) {
    throw new TypeError(`model: this engine serves ${rt.model.model_key}, not ${model}`);
  }
  const record = newRecord(rt, samplingOf(sampling), null, true);
  const forget = () => {
    if (rt.current === record) rt.current = null;
    dropSession(rt, record);
  };
  try {
    await rt.exclusive(() => readTurn(rt, record, messages));
  } catch (e) {
    forget();
    throw e;
  }
  return respond(rt, record, maxCompletionTokens ?? maxTokens, stream, forget);
}

/**
 * Write up to `maxTokens` more of the record's last answer: a chat.completion, or with
 * `stream` the chunks as they come. `done` runs once the answer is over.
 */
export function respond(rt, record, maxTokens = DEFAULT_MAX_TOKENS, stream = false, done = () => {}) {
  const chunks = new ChunkStream(rt.model.anchor_model);
  const write = record.mode === 'server' ? () => writeOnServer(rt, record, maxTokens, chunks)
    : () => writeOnGpu(rt, record, maxTokens, chunks);
  rt.exclusive(write).then(() => chunks.end(), (e) => chunks.end(e)).finally(() => {
    rt.reconciler = null;
    done();
  });
  return stream ? chunks : chunks.completion();
}
