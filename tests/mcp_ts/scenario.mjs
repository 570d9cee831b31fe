// An agent's session with the real fly-vault-mcp, driven over stdio by the official
// TypeScript MCP SDK (@modelcontextprotocol/sdk, pinned in package.json).
//
//   node tests/mcp_ts/scenario.mjs PYTHON        (or FLY_VAULT_PYTHON=PYTHON)
//
// PYTHON is the interpreter that has flyvault installed; the server is started as
// `PYTHON -m flyvault.mcp_server.main` with this process's whole environment (HOME, XDG_*,
// ...), so a test's isolated config and runtime directories are the ones used. The
// scenario brings the local dev vault up with local_vault(action="up") and down at the end;
// for the reprovision step it adds a `rootfs` line to [vault.local] in the config file
// vault_status() names, and takes it out again (nothing is ever reprovisioned).
//
// Every step checks what it expects. One JSON line per passed step goes to stdout; on the
// first failed expectation the step, what was expected and the tool result's text go to
// stderr (with the tail of the server's stderr) and the exit status is 1. Started from
// tests/test_mcp_scenario_ts.py, which stops the local vault whatever happens.

import crypto from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import zlib from "node:zlib";

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, "..", "..");
const PYTHON = process.argv[2] || process.env.FLY_VAULT_PYTHON;
const VAULT = "local";

if (!PYTHON) {
  process.stderr.write("usage: node scenario.mjs PYTHON (or set FLY_VAULT_PYTHON)\n");
  process.exit(2);
}

class Expectation extends Error {
  constructor(message, result) {
    super(message);
    this.result = result;
  }
}

/** The text a tool result shows the model (content[0].text), for failure messages. */
function textOf(result) {
  if (!result) return "";
  const first = (result.content || [])[0];
  return first && first.type === "text" ? first.text : JSON.stringify(result);
}

function expect(condition, message, result) {
  if (!condition) throw new Expectation(message, result);
}

function expectEqual(actual, expected, what, result) {
  if (actual !== expected) {
    throw new Expectation(
      `${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`,
      result,
    );
  }
}

// ---- the server ----------------------------------------------------------------------

const serverStderr = [];
let serverStderrBytes = 0;
const env = {};
for (const [key, value] of Object.entries(process.env)) {
  if (value !== undefined) env[key] = value;
}
const transport = new StdioClientTransport({
  command: PYTHON,
  args: ["-m", "flyvault.mcp_server.main"],
  env,
  cwd: REPO,
  stderr: "pipe",
});
// Keep the server's stderr (logs) for a failure report; the newest 64 KiB are enough.
transport.stderr?.on("data", (chunk) => {
  serverStderr.push(chunk);
  serverStderrBytes += chunk.length;
  while (serverStderrBytes > 65536 && serverStderr.length > 1) {
    serverStderrBytes -= serverStderr.shift().length;
  }
});
const client = new Client({ name: "fly-vault-ts-scenario", version: "1.0.0" });

/** Call a tool; a tool error (isError) fails the step unless `error` is true. */
async function call(name, args, { error = false, timeoutMs = 90_000 } = {}) {
  const result = await client.callTool({ name, arguments: args }, undefined, {
    timeout: timeoutMs,
  });
  if (error) {
    expectEqual(result.isError === true, true, `${name} isError`, result);
    return { result, data: result.structuredContent, text: textOf(result) };
  }
  expect(!result.isError, `${name}(${JSON.stringify(args)}) returned a tool error`, result);
  expect(
    result.structuredContent && typeof result.structuredContent === "object",
    `${name} returned no structuredContent`,
    result,
  );
  return { result, data: result.structuredContent, text: textOf(result) };
}

// ---- steps ---------------------------------------------------------------------------

let currentStep = "start";

async function step(id, name, body) {
  currentStep = `${id} (${name})`;
  const started = Date.now();
  const details = (await body()) || {};
  process.stdout.write(
    JSON.stringify({ step: id, name, ok: true, ms: Date.now() - started, ...details }) + "\n",
  );
}

/**
 * read_output until the session's command has exited: each call continues where the
 * previous result ended; checks that the ranges join up with nothing missing or repeated.
 */
async function readUntilExit(sessionId, { first, waitSeconds = 10, maxCalls = 30 } = {}) {
  let stdout = first ? first.stdout : "";
  let stderr = first ? first.stderr : "";
  let last = first;
  let calls = 0;
  while (!last || last.running) {
    expect(
      calls < maxCalls,
      `${sessionId} still running after ${maxCalls} read_output calls`,
      last && last._result,
    );
    calls += 1;
    const { result, data } = await call("read_output", {
      vault: VAULT,
      session_id: sessionId,
      wait_seconds: waitSeconds,
    });
    if (last) {
      const what = `read_output #${calls} offset (the previous next_offset)`;
      expectEqual(data.offset, last.next_offset, what, result);
    }
    expectEqual(data.dropped_bytes, 0, `read_output #${calls} dropped_bytes`, result);
    expectEqual(data.omitted_bytes, 0, `read_output #${calls} omitted_bytes`, result);
    stdout += data.stdout;
    stderr += data.stderr;
    last = { ...data, _result: result };
  }
  return { stdout, stderr, last, calls };
}

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

const sha256 = (bytes) => crypto.createHash("sha256").update(bytes).digest("hex");

async function scenario() {
  await client.connect(transport);

  await step("a", "local_vault up", async () => {
    const { result, data } = await call("local_vault", { action: "up" }, { timeoutMs: 120_000 });
    expectEqual(data.running, true, "running", result);
    expectEqual(data.vault, VAULT, "vault", result);
    return { address: data.address, mode: data.mode, started_now: data.started_now };
  });

  await step("b", "exec: both streams apart and the exit code", async () => {
    const { result, data } = await call("exec", {
      vault: VAULT,
      command: "echo out; echo err >&2; exit 3",
    });
    expectEqual(data.stdout, "out\n", "stdout", result);
    expectEqual(data.stderr, "err\n", "stderr", result);
    expectEqual(data.exit_code, 3, "exit_code", result);
    expectEqual(data.running, false, "running", result);
    return { session_id: data.session_id };
  });

  await step("c", "a 40-second job followed by offset, nothing lost or repeated", async () => {
    const command =
      "i=0; while [ $i -lt 40 ]; do echo tick $i; i=$((i+1)); sleep 1; done";
    const { result, data } = await call("exec", {
      vault: VAULT,
      command,
      session_id: "ts-long",
      wait_seconds: 2,
    });
    expectEqual(data.running, true, "running after 2 s", result);
    expectEqual(data.session_id, "ts-long", "session_id", result);
    expectEqual(data.offset, 0, "offset of the first result", result);
    const read = await readUntilExit("ts-long", { first: { ...data, _result: result } });
    const expected = Array.from({ length: 40 }, (_, i) => `tick ${i}\n`).join("");
    expectEqual(read.stdout, expected, "the concatenated stdout", read.last._result);
    expectEqual(read.stderr, "", "the concatenated stderr", read.last._result);
    expectEqual(read.last.exit_code, 0, "exit_code", read.last._result);
    expectEqual(read.last.total_bytes, expected.length, "total_bytes", read.last._result);
    expectEqual(read.last.next_offset, expected.length, "the last next_offset", read.last._result);
    return { read_output_calls: read.calls, bytes: read.stdout.length };
  });

  await step("d", "6 MB of output, the head read back by offset", async () => {
    const { result, data } = await call(
      "exec",
      {
        vault: VAULT,
        command:
          "echo FIRST-LINE; head -c 6000000 /dev/zero | tr '\\0' x; echo; echo LAST-LINE",
        max_output_bytes: 4096,
        wait_seconds: 120,
      },
      { timeoutMs: 180_000 },
    );
    expectEqual(data.running, false, "running", result);
    expectEqual(data.exit_code, 0, "exit_code", result);
    expect(data.total_bytes > 6_000_000, `total_bytes > 6000000 (got ${data.total_bytes})`, result);
    expect(data.omitted_bytes > 0, `omitted_bytes > 0 (got ${data.omitted_bytes})`, result);
    expect(data.stdout.startsWith("FIRST-LINE\n"), "stdout starts with FIRST-LINE", result);
    expect(data.stdout.endsWith("LAST-LINE\n"), "stdout ends with LAST-LINE", result);
    expect(
      data.stdout.length + data.stderr.length <= 4096 + 1024,
      `the result's output is near max_output_bytes (got ${data.stdout.length} characters)`,
      result,
    );
    const head = await call("read_output", {
      vault: VAULT,
      session_id: data.session_id,
      offset: 0,
      length: 11,
      stream: "stdout",
    });
    expectEqual(head.data.stdout, "FIRST-LINE\n", "stdout of offset 0, length 11", head.result);
    expectEqual(head.data.dropped_bytes, 0, "dropped_bytes", head.result);
    expectEqual(head.data.offset, 0, "offset", head.result);
    expectEqual(head.data.next_offset, 11, "next_offset", head.result);
    return {
      session_id: data.session_id,
      total_bytes: data.total_bytes,
      omitted_bytes: data.omitted_bytes,
    };
  });

  await step("e", "connect: type into a shell, read plain text", async () => {
    const shell = await call("connect", { vault: VAULT });
    const sessionId = shell.data.session_id;
    expect(typeof sessionId === "string" && sessionId.length > 0, "a session_id", shell.result);
    expectEqual(shell.data.tty, true, "tty", shell.result);
    let stdout = shell.data.stdout;
    const sent = await call("send_input", {
      vault: VAULT,
      session_id: sessionId,
      text: "echo $((6*7))\n",
    });
    expectEqual(sent.data.sent_bytes, 14, "sent_bytes", sent.result);
    let last = shell.result;
    for (let i = 0; i < 10 && !stdout.split("\n").includes("42"); i += 1) {
      const read = await call("read_output", {
        vault: VAULT,
        session_id: sessionId,
        until: "output",
        wait_seconds: 5,
      });
      stdout += read.data.stdout;
      last = read.result;
    }
    expect(stdout.split("\n").includes("42"), `a line "42" in ${JSON.stringify(stdout)}`, last);
    expect(!stdout.includes("\x1b"), `no ESC in the shell's text ${JSON.stringify(stdout)}`, last);
    expect(!stdout.includes("\r"), `no CR in the shell's text ${JSON.stringify(stdout)}`, last);
    await call("send_input", { vault: VAULT, session_id: sessionId, text: "exit\n" });
    let ended = null;
    for (let i = 0; i < 6 && !(ended && ended.data.running === false); i += 1) {
      ended = await call("read_output", {
        vault: VAULT,
        session_id: sessionId,
        wait_seconds: 10,
      });
    }
    expectEqual(ended.data.running, false, "running after exit", ended.result);
    expectEqual(ended.data.exit_code, 0, "the shell's exit_code", ended.result);
    return { session_id: sessionId };
  });

  await step("f", "a web server on the vault reached through a forward", async () => {
    const port = await freePort();
    // PYTHONUNBUFFERED: Python block-buffers a piped stdout, and "Serving HTTP" would only
    // come at exit. It goes in the exec request's env, not through the shell line.
    const web = await call("exec", {
      vault: VAULT,
      command: `python3 -m http.server --bind 127.0.0.1 ${port}`,
      env: { PYTHONUNBUFFERED: "1" },
      session_id: "ts-web",
      wait_seconds: 20,
      pattern: "Serving HTTP",
    });
    expectEqual(web.data.running, true, "running", web.result);
    expect(web.data.stdout.includes("Serving HTTP"), "the server says it serves", web.result);
    const started = await call("forward", { action: "start", vault: VAULT, remote_port: port });
    expectEqual(started.data.forwards.length, 1, "forwards started", started.result);
    const forward = started.data.forwards[0];
    expect(forward.local_port > 0, "a local_port", started.result);
    // The server said it serves and the forward is listening: one request must do.
    let status = null;
    let lastError = null;
    try {
      const response = await fetch(`http://127.0.0.1:${forward.local_port}/`, {
        signal: AbortSignal.timeout(10000),
      });
      status = response.status;
      await response.arrayBuffer();
    } catch (error) {
      lastError = error;
    }
    const what = `HTTP status through the forward (last error: ${lastError})`;
    expectEqual(status, 200, what, started.result);
    const stopped = await call("forward", { action: "stop", forward_id: forward.forward_id });
    expect(
      stopped.data.stopped.includes(forward.forward_id),
      `${forward.forward_id} in stopped`,
      stopped.result,
    );
    const sig = await call("signal", { vault: VAULT, session_id: "ts-web", signal: "TERM" });
    expectEqual(sig.data.signal_name, "SIGTERM", "the signal sent", sig.result);
    const read = await readUntilExit("ts-web", { waitSeconds: 10, maxCalls: 6 });
    const ended = read.last;
    expect(
      ended.signal_name === "SIGTERM" || ended.signal === 15 || ended.exit_status === 143,
      `ended by SIGTERM (signal ${ended.signal}, signal_name ${ended.signal_name}, ` +
        `exit_code ${ended.exit_code})`,
      ended._result,
    );
    return { remote_port: port, local_port: forward.local_port, forward_id: forward.forward_id };
  });

  await step("g", "a binary file written and read back, by SHA-256", async () => {
    const bytes = crypto.randomBytes(100 * 1024);
    const digest = sha256(bytes);
    const file = `/tmp/ts-scenario-${crypto.randomBytes(8).toString("hex")}.bin`;
    try {
      const written = await call("write_file", {
        vault: VAULT,
        path: file,
        content: bytes.toString("base64"),
        encoding: "base64",
      });
      expectEqual(written.data.sha256, digest, "sha256 of what the vault stored", written.result);
      expectEqual(written.data.size, bytes.length, "size", written.result);
      const pieces = [];
      let offset = 0;
      let reads = 0;
      for (;;) {
        expect(reads < 10, "read_file still truncated after 10 reads", null);
        reads += 1;
        const read = await call("read_file", {
          vault: VAULT,
          path: file,
          encoding: "base64",
          offset,
          limit: 200000,
        });
        expectEqual(read.data.encoding, "base64", "encoding", read.result);
        expectEqual(read.data.sha256, digest, "sha256 of the whole file", read.result);
        const piece = Buffer.from(read.data.content, "base64");
        expectEqual(read.data.byte_offset, offset, "byte_offset", read.result);
        expectEqual(read.data.returned_bytes, piece.length, "returned_bytes", read.result);
        pieces.push(piece);
        if (!read.data.truncated) break;
        expect(read.data.next_offset > offset, "next_offset moves on", read.result);
        offset = read.data.next_offset;
      }
      const back = Buffer.concat(pieces);
      expectEqual(back.length, bytes.length, "bytes read back", null);
      expectEqual(sha256(back), digest, "sha256 of the bytes read back", null);
      return { path: file, sha256: digest, reads };
    } finally {
      await client
        .callTool({ name: "exec", arguments: { vault: VAULT, argv: ["rm", "-f", file] } })
        .catch(() => {});
    }
  });

  await step("h", "list_exec shows how the named sessions ended", async () => {
    const { result, data } = await call("list_exec", { vault: VAULT });
    const byId = new Map(data.sessions.map((s) => [s.session_id, s]));
    const long = byId.get("ts-long");
    expect(long, "ts-long listed", result);
    expectEqual(long.running, false, "ts-long running", result);
    expectEqual(long.exit_code, 0, "ts-long exit_code", result);
    const web = byId.get("ts-web");
    expect(web, "ts-web listed", result);
    expectEqual(web.running, false, "ts-web running", result);
    return { sessions: data.sessions.map((s) => s.session_id) };
  });

  await step("i", "reprovision without confirm is refused", async () => {
    // The local vault's entry names no rootfs: that is refused first, in words.
    const bare = await call("reprovision", { vault: VAULT }, { error: true });
    expect(
      bare.text.includes("either rootfs path or rootfs_url is required for reprovision"),
      "without a rootfs in [vault.local], the refusal names the missing rootfs",
      bare.result,
    );
    // With one configured (as a user would add it; a host-mode vault never uses it), the
    // refusal is the confirmation one, and nothing happens.
    const status = await call("vault_status", {});
    const configFile = status.data.config_file;
    expect(
      typeof configFile === "string" && fs.existsSync(configFile),
      "vault_status() names the config file",
      status.result,
    );
    const original = fs.readFileSync(configFile, "utf8");
    const header = `[vault.${VAULT}]\n`;
    expect(original.includes(header), `${header.trim()} in ${configFile}`, status.result);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "ts-scenario-"));
    const rootfs = path.join(dir, "never-used-rootfs.tar.gz");
    fs.writeFileSync(rootfs, zlib.gzipSync(Buffer.alloc(1024))); // an empty tar
    try {
      const line = `rootfs = ${JSON.stringify(rootfs)}\n`;
      fs.writeFileSync(configFile, original.replace(header, header + line));
      const { result, text } = await call("reprovision", { vault: VAULT }, { error: true });
      expect(text.includes("reprovision not started"), "the error says it did not start", result);
      expect(text.includes(rootfs), "the error names the rootfs it would use", result);
      expect(text.includes("confirm"), "the error text mentions confirm", result);
      // Nothing happened: the vault still runs commands, the sessions are still there.
      const still = await call("exec", { vault: VAULT, command: "echo still here" });
      expectEqual(still.data.stdout, "still here\n", "an exec after the refusal", still.result);
      const listed = await call("list_exec", { vault: VAULT });
      expect(
        listed.data.sessions.some((s) => s.session_id === "ts-long"),
        "ts-long still listed after the refusal",
        listed.result,
      );
      return { without_rootfs: bare.text.split("\n")[0], with_rootfs: text.split("\n")[0] };
    } finally {
      const now = fs.readFileSync(configFile, "utf8");
      fs.writeFileSync(configFile, now.replace(/^rootfs = .*never-used-rootfs.*\n/m, ""));
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  await step("j", "local_vault down", async () => {
    const { result, data } = await call("local_vault", { action: "down" }, { timeoutMs: 60_000 });
    expectEqual(data.running, false, "running", result);
    return { pid: data.pid };
  });
}

let status = 0;
try {
  await scenario();
} catch (error) {
  status = 1;
  const lines = [`scenario step ${currentStep} failed: ${error && error.message}`];
  if (error instanceof Expectation) {
    lines.push("----- the tool result's text", textOf(error.result));
    if (error.result && error.result.structuredContent) {
      lines.push("----- structuredContent", JSON.stringify(error.result.structuredContent));
    }
  } else if (error && error.stack) {
    lines.push(error.stack);
  }
  lines.push("----- fly-vault-mcp stderr (tail)", Buffer.concat(serverStderr).toString("utf8"));
  process.stderr.write(lines.join("\n") + "\n");
} finally {
  await client.close().catch(() => {});
}
process.exit(status);
