// Validates AsyncAPI documents with @asyncapi/parser: `node scripts/validate-asyncapi.cjs FILE...`
// (with NODE_PATH naming the node_modules that hold the parser). Every diagnostic is printed;
// an error fails the run.
const fs = require("fs");
const { Parser, DiagnosticSeverity } = require("@asyncapi/parser");

const severities = ["error", "warning", "info", "hint"];

async function validate(parser, file) {
  const { document, diagnostics } = await parser.parse(fs.readFileSync(file, "utf8"));
  for (const d of diagnostics) {
    console.error(`${file}: ${severities[d.severity]} ${d.code} at /${d.path.join("/")}: ${d.message}`);
  }
  const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
  if (!document || errors.length > 0) {
    console.error(`${file}: not a valid AsyncAPI document (${errors.length} errors)`);
    return false;
  }
  console.log(
    `${file}: valid AsyncAPI ${document.version()}: ${document.channels().length} channels, ` +
      `${document.operations().length} operations, ${document.servers().length} servers`
  );
  return true;
}

(async () => {
  const parser = new Parser();
  let valid = process.argv.length > 2;
  for (const file of process.argv.slice(2)) {
    valid = (await validate(parser, file)) && valid;
  }
  process.exit(valid ? 0 : 1);
})();
