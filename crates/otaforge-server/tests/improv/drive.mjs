// Drives the host stand-in of the setup firmware (argv[2]: its executable, argv[3]: its
// store file) with improv-wifi-serial-sdk, the Improv client inside ESP Web Tools, over a
// port made of the child's stdin and stdout. Prints one JSON line of what happened.
import { spawn } from "node:child_process";
import { Readable, Writable } from "node:stream";
import { ImprovSerial } from "improv-wifi-serial-sdk/dist/serial.js";

const [exe, store] = process.argv.slice(2);
const child = spawn(exe, [store], { stdio: ["pipe", "pipe", "inherit"] });
const port = { readable: Readable.toWeb(child.stdout), writable: Writable.toWeb(child.stdin) };
const quiet = { log() {}, debug() {}, error() {} };
const improv = new ImprovSerial(port, quiet);
const out = {};
try {
  out.info = await improv.initialize(3000);
  out.stateBefore = improv.state;
  try {
    await improv.provision("HomeNet", "wrong-pass", 5000);
    out.wrong = "accepted";
  } catch (e) {
    out.wrong = String(e);
  }
  await improv.provision("HomeNet", "right-pass", 5000);
  out.nextUrl = improv.nextUrl;
  await improv.requestCurrentState();
  out.stateAfter = improv.state;
} catch (e) {
  out.failed = String(e && e.stack ? e.stack : e);
}
console.log(JSON.stringify(out));
child.kill();
process.exit(0);
