// Reader of the `.holo` container: the browser twin of `load_hologram` in protocol/holo.py.
//
// The byte layout, the reader's checks, their order and their error phrases are specified
// in protocol/SPEC.md; both readers must pass the shared vectors of protocol/vectors/.
// Every byte is hostile: each length, shape and offset is checked against the input
// before anything is allocated from it.

const MAGIC = [0x89, 0x48, 0x4f, 0x4c, 0x4f, 0x0d, 0x0a, 0x1a];
const VERSION = 1;
const KIND_NAMES = {1: 'conversation', 2: 'model_pack', 3: 'captured_state'};
const DTYPES = [ // by dtype code; f16 stays raw bits (see f16ToF32) so it can go to the GPU as is
  {name: 'f32', Array: Float32Array},
  {name: 'f16', Array: Uint16Array},
  {name: 'i8', Array: Int8Array},
  {name: 'u8', Array: Uint8Array},
  {name: 'i16', Array: Int16Array},
  {name: 'u16', Array: Uint16Array},
  {name: 'i32', Array: Int32Array},
  {name: 'u32', Array: Uint32Array},
];
const FLAG_DEFLATE = 1;
const HEADER_LEN = 32;
const CHECKSUM_LEN = 32;
const ALIGN = 64;
const MAX_META = 2 ** 20;
const MAX_TENSORS = 2 ** 16;
const MAX_NAME = 256;
const MAX_NDIM = 8;
const MAX_DIM = 2 ** 31;
const MAX_TENSOR_BYTES = 2 ** 40; // bounds the product of a shape's nonzero dimensions times the dtype size
export const DEFAULT_MAX_INFLATE = 2 ** 30;
// Input fed to the decompressor at a time: the browser inflates a whole chunk before the
// reader can stop it, so this bounds what a zip bomb allocates beyond the tensor's size
// (zlib expands at most ~1032x: 16 MiB here).
const INFLATE_CHUNK = 16 * 1024;

// Strict, and keeping a byte order mark so that JSON.parse rejects it as Python's json does.
const utf8 = new TextDecoder('utf-8', {fatal: true, ignoreBOM: true});

export class HoloError extends Error {
  constructor(message) {
    super(message);
    this.name = 'HoloError';
  }
}

/**
 * Parse and verify a `.holo` file; throws HoloError naming the first failed check.
 *
 * Returns {kind, version, meta, tensors}; `tensors` maps each name (in directory order,
 * except that JS objects list integer-like keys first) to {dtype, shape, data}, with
 * `data` a typed array of the dtype (f16: Uint16Array of the raw bits). Raw payloads
 * are views into the input's buffer, not copies; deflated ones are inflated into new
 * buffers, in total at most `maxInflate` bytes.
 */
export async function loadHologram(bytes, {maxInflate = DEFAULT_MAX_INFLATE} = {}) {
  let data = asBytes(bytes);
  // Payload offsets are multiples of 64, so views are aligned unless the input view is not.
  if (data.byteOffset % 4) data = data.slice();
  const n = data.length;
  if (n < HEADER_LEN + CHECKSUM_LEN) throw new HoloError(`truncated: ${n} bytes is shorter than the header`);
  const view = new DataView(data.buffer, data.byteOffset, n);
  if (!MAGIC.every((b, i) => data[i] === b)) throw new HoloError('bad magic: not a .holo file');
  const version = view.getUint16(8, true);
  if (version !== VERSION) throw new HoloError(`unsupported version ${version} (this reader knows ${VERSION})`);
  const kind = view.getUint16(10, true);
  if (!(kind in KIND_NAMES)) throw new HoloError(`unknown kind code ${kind}`);
  const metaLen = view.getUint32(12, true);
  const nTensors = view.getUint32(16, true);
  const dirLen = view.getUint32(20, true);
  const fileLen = u64(view, 24);
  if (fileLen !== n) throw new HoloError(`truncated or padded: header says ${fileLen} bytes, got ${n}`);
  const bodyEnd = n - CHECKSUM_LEN;
  const digest = new Uint8Array(await sha256(data.subarray(0, bodyEnd)));
  if (!digest.every((b, i) => b === data[bodyEnd + i])) throw new HoloError('checksum mismatch: the file is corrupted');
  if (metaLen > MAX_META || nTensors > MAX_TENSORS) {
    throw new HoloError(`absurd header: meta_len=${metaLen}, n_tensors=${nTensors}`);
  }
  const dataStart = HEADER_LEN + metaLen + dirLen;
  if (dataStart > bodyEnd) throw new HoloError('metadata and directory run past the end of the file');
  let meta;
  try {
    meta = JSON.parse(utf8.decode(data.subarray(HEADER_LEN, HEADER_LEN + metaLen)));
  } catch (e) {
    throw new HoloError(`metadata is not valid JSON: ${e.message}`);
  }
  if (meta === null || typeof meta !== 'object' || Array.isArray(meta)) {
    throw new HoloError('metadata must be a JSON object');
  }

  let pos = HEADER_LEN + metaLen;
  const take = (size) => {
    if (pos + size > dataStart) throw new HoloError('directory entry runs past the directory');
    pos += size;
    return pos - size;
  };
  // No prototype: a tensor may be named "__proto__", and "constructor" must not seem present.
  const tensors = Object.create(null);
  let prevEnd = dataStart;
  let inflated = 0;
  for (let i = 0; i < nTensors; i++) {
    const nameLen = view.getUint16(take(2), true);
    if (nameLen < 1 || nameLen > MAX_NAME) throw new HoloError(`bad tensor name length ${nameLen}`);
    const at = take(nameLen);
    let name;
    try {
      name = utf8.decode(data.subarray(at, at + nameLen));
    } catch {
      throw new HoloError('tensor name is not UTF-8');
    }
    const fail = (what) => new HoloError(`tensor '${name}': ${what}`);
    const t = take(4);
    const [code, ndim, flags] = [data[t], data[t + 1], data[t + 2]];
    if (code >= DTYPES.length) throw fail(`unknown dtype code ${code}`);
    if (ndim > MAX_NDIM || flags & ~FLAG_DEFLATE) throw fail(`bad rank ${ndim} or flags ${flags}`);
    const s = take(4 * ndim);
    const shape = Array.from({length: ndim}, (_, d) => view.getUint32(s + 4 * d, true));
    const {name: dtype, Array: TypedArray} = DTYPES[code];
    // A 0 dimension empties the tensor but must not hide absurd other dimensions. Doubles
    // decide this exactly: every partial product is exact while at most 2^40, and once
    // past it, rounding (monotone) keeps it past.
    const extent = shape.reduce((a, d) => a * (d || 1), TypedArray.BYTES_PER_ELEMENT);
    if (shape.some((d) => d >= MAX_DIM) || extent > MAX_TENSOR_BYTES) throw fail(`absurd shape [${shape}]`);
    const o = take(16);
    const offset = u64(view, o);
    const nbytes = u64(view, o + 8);
    if (name in tensors) throw new HoloError(`duplicate tensor name '${name}'`);
    if (offset % ALIGN || offset < prevEnd || offset + nbytes > bodyEnd) {
      throw fail(`offset ${offset}+${nbytes} out of range or misaligned`);
    }
    prevEnd = offset + nbytes;
    const rawSize = shape.reduce((a, d) => a * d, TypedArray.BYTES_PER_ELEMENT); // exact: <= extent
    let payload = data.subarray(offset, offset + nbytes);
    if (flags & FLAG_DEFLATE) {
      inflated += rawSize;
      if (inflated > maxInflate) throw fail(`inflated size exceeds limit ${maxInflate}`);
      payload = await inflate(payload, rawSize, fail);
    } else if (nbytes !== rawSize) {
      throw fail(`${nbytes} bytes stored, shape [${shape}] needs ${rawSize}`);
    }
    const elements = rawSize / TypedArray.BYTES_PER_ELEMENT;
    tensors[name] = {dtype, shape, data: new TypedArray(payload.buffer, payload.byteOffset, elements)};
  }
  if (pos !== dataStart) throw new HoloError('directory length does not match its entries');
  return {kind: KIND_NAMES[kind], version, meta, tensors};
}

/** Lowercase hex SHA-256 of a whole `.holo` file: its identity (ETag, IndexedDB key). */
export async function contentHash(bytes) {
  const digest = new Uint8Array(await sha256(asBytes(bytes)));
  return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** Float32Array of the values of IEEE 754 binary16 bits (exact: f32 holds every f16). */
export function f16ToF32(bits) {
  const out = new Float32Array(bits.length);
  for (let i = 0; i < bits.length; i++) {
    const h = bits[i];
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >> 10) & 0x1f;
    const frac = h & 0x3ff;
    if (exp === 0) out[i] = sign * frac * 2 ** -24;
    else if (exp === 0x1f) out[i] = frac ? NaN : sign * Infinity;
    else out[i] = sign * (0x400 + frac) * 2 ** (exp - 25);
  }
  return out;
}

function asBytes(input) {
  if (input instanceof ArrayBuffer) return new Uint8Array(input);
  if (ArrayBuffer.isView(input)) return new Uint8Array(input.buffer, input.byteOffset, input.byteLength);
  throw new TypeError('expected an ArrayBuffer or a typed array');
}

function sha256(bytes) {
  if (!globalThis.crypto?.subtle) throw new Error('SHA-256 needs a secure context (https or localhost)');
  return crypto.subtle.digest('SHA-256', bytes);
}

function u64(view, at) {
  return view.getUint32(at, true) + view.getUint32(at + 4, true) * 2 ** 32;
}

// Inflate the zlib stream `stored` to exactly rawSize bytes, with Python's verdicts: bytes
// after the stream's end, a stream cut short and output beyond rawSize all make it
// "not inflate to" the size; corrupt data read before any of those is a bad stream.
// (Python's zlib stops at rawSize bytes of output, the browser's decodes on: corrupt data
// just past that point can be a bad stream here and a size mismatch there. Both reject.)
async function inflate(stored, rawSize, fail) {
  const out = new Uint8Array(rawSize);
  let run = await decompress(pieces(stored, 0, stored.length, INFLATE_CHUNK), out);
  if (run.state === 'rejected') {
    // The browser rejects a whole chunk both for corrupt data and for bytes after the end
    // of the stream, possibly before handing over output past rawSize. Replay the rejected
    // chunk a byte at a time to find the first rejected byte, then see whether the stream
    // had already ended before it.
    const at = run.consumed;
    const end = Math.min(at + INFLATE_CHUNK, stored.length);
    run = await decompress([...pieces(stored, 0, at, INFLATE_CHUNK), ...pieces(stored, at, end, 1)], out);
    if (run.state === 'rejected') {
      const before = await decompress(pieces(stored, 0, run.consumed, INFLATE_CHUNK), out);
      if (before.state !== 'ended') throw fail(`bad deflate stream (${run.error.message})`);
    }
  }
  if (run.state !== 'ended' || run.got !== rawSize) throw fail(`deflate stream does not inflate to ${rawSize} bytes`);
  return out;
}

function* pieces(bytes, start, end, size) {
  for (let i = start; i < end; i += size) yield bytes.subarray(i, Math.min(i + size, end));
}

// Feed `parts` to a zlib DecompressionStream, writing the output into `out` and stopping
// as soon as there is more. state: 'ended' (the stream ended with the last part), 'over'
// (more than out.length bytes came out), 'rejected' (the part after the first `consumed`
// bytes was refused) or 'unfinished' (the parts ended inside the stream).
async function decompress(parts, out) {
  const stream = new DecompressionStream('deflate');
  const writer = stream.writable.getWriter();
  const reader = stream.readable.getReader();
  let got = 0;
  let over = false;
  const reading = (async () => {
    for (let r = await reader.read(); !r.done; r = await reader.read()) {
      if (got + r.value.length > out.length) {
        over = true;
        await reader.cancel();
        return;
      }
      out.set(r.value, got);
      got += r.value.length;
    }
  })().catch(() => {}); // a failing stream also fails the writer, which reports it
  let state = 'ended';
  let consumed = 0;
  let error = null;
  try {
    for (const part of parts) {
      await writer.write(part);
      consumed += part.length;
    }
  } catch (e) {
    [state, error] = ['rejected', e];
  }
  if (state === 'ended') await writer.close().catch(() => { state = 'unfinished'; });
  await reading;
  return {got, consumed, error, state: over ? 'over' : state};
}
