// Server mode: the anchor writes the answer alone (/v1/chat/completions, streamed), so a
// browser without WebGPU still answers; its text pieces become chunks as they arrive.

import { lastAnswer } from './conversation.js';

export async function writeOnServer(rt, record, maxTokens, chunks) {
  const answer = lastAnswer(record);
  const messages = record.turns.filter((t) => t !== answer).map(({ role, content }) => ({ role, content }));
  const controller = new AbortController();
  chunks.cancel = () => controller.abort();
  const r = await rt.anchor.request('/v1/chat/completions', { method: 'POST', signal: controller.signal,
    json: { messages, max_tokens: maxTokens, stream: true, ...record.sampling } });
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  const t0 = performance.now();
  let buffer = '', pieces = 0, finish = null;
  // The anchor's stream has text, not token ids: `confirmed` counts its pieces.
  const hpi = () => ({ mode: 'server', confirmed: pieces, tokens: [], provisional: [], provisional_text: '',
    correction: null });
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split('\n\n');
      buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, '');
        if (data === '[DONE]') continue;
        const choice = JSON.parse(data).choices[0];
        if (choice.delta.content) {
          answer.content += choice.delta.content;
          pieces += 1;
          chunks.push(choice.delta.content, hpi());
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      rt.stats.tokensPerSecond = pieces / ((performance.now() - t0) / 1000);
    }
  } catch (e) {
    if (e.name !== 'AbortError') throw e;
  } finally {
    answer.ended = finish === 'stop';
    await rt.persist(record);
  }
  chunks.push('', hpi(), finish || 'length');
}
