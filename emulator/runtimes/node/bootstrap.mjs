// lambdaemu's Node.js runtime interface client: the loop a Lambda Node.js runtime runs, in plain
// JavaScript (no native build), speaking the Lambda Runtime API (2018-06-01) over node:http.
//
// It follows the official client (aws-lambda-nodejs-runtime-interface-client: Runtime.js,
// CallbackContext.js, UserFunction.js, Errors.js, InvokeContext.js) in what a handler can observe:
//   - the handler is `_HANDLER` = `path/to/module.function` (Lambda's form) under LAMBDA_TASK_ROOT,
//     loaded as CommonJS or as an ES module by the same rules (extensionless, .js by the nearest
//     package.json "type", .mjs, .cjs, then a node module name);
//   - async handlers (a returned promise settles the invocation) and callback handlers
//     `(event, context, callback)`: with `context.callbackWaitsForEmptyEventLoop` true (the default) the
//     callback's result is posted only when the event loop is empty ('beforeExit'), so an open pool
//     socket or a pending timer holds the response back until the invocation times out, as in Lambda;
//     a non-async handler that never calls back succeeds with null once the loop is empty, and an async
//     one whose promise never settles fails with Runtime.NodeJsExit;
//   - `context`: awsRequestId, functionName, functionVersion, memoryLimitInMB, invokedFunctionArn,
//     logGroupName, logStreamName, clientContext, identity, getRemainingTimeInMillis(),
//     callbackWaitsForEmptyEventLoop, succeed/fail/done;
//   - errors posted as {errorType, errorMessage, trace} with the Lambda-Runtime-Function-Error-Type
//     header; a failed init is posted to /runtime/init/error and the process exits (129); an uncaught
//     exception or unhandled rejection during an invocation fails it and ends the process (129 / 128);
//   - console output as Lambda writes it: `time<TAB>requestId<TAB>LEVEL<TAB>message`, one line each.
// Response streaming (awslambda.streamifyResponse) is not supported: such a handler fails its init.

import fs from 'node:fs';
import http from 'node:http';
import { createRequire } from 'node:module';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import util from 'node:util';

const require = createRequire(import.meta.url);
const API_PREFIX = '/2018-06-01/runtime';
const ERROR_TYPE_HEADER = 'Lambda-Runtime-Function-Error-Type';

// --- errors ------------------------------------------------------------------------------------------

class RuntimeError extends Error {}
const errorClasses = {};
for (const name of ['ImportModuleError', 'HandlerNotFound', 'MalformedHandlerName', 'UserCodeSyntaxError',
  'MalformedStreamingHandler', 'NodeJsExit', 'UnhandledPromiseRejection']) {
  errorClasses[name] = class extends RuntimeError {};
  errorClasses[name].prototype.name = `Runtime.${name}`;
}
const NODEJS_EXIT_MESSAGE = 'The Lambda runtime client detected an unexpected Node.js exit code. This is most '
  + 'commonly caused by a Promise that was never settled.';

function isErrorLike(obj) {
  return obj && typeof obj.name === 'string' && typeof obj.message === 'string' && typeof obj.stack === 'string';
}

/** What Lambda's Node runtime posts for an error (Errors.toRapidResponse). */
function toRapidResponse(error) {
  try {
    if (util.types.isNativeError(error) || isErrorLike(error)) {
      return { errorType: error.name, errorMessage: error.message, trace: error.stack.split('\n') };
    }
    return { errorType: typeof error, errorMessage: String(error), trace: [] };
  } catch (_) {
    return {
      errorType: 'handled',
      errorMessage: 'callback called with Error argument, but there was a problem while retrieving one or more '
        + 'of its message, name, and stack',
    };
  }
}

// --- logging -----------------------------------------------------------------------------------------

let currentRequestId;

function patchConsole() {
  const write = (level) => (message, ...params) => {
    const line = `${new Date().toISOString()}\t${currentRequestId}\t${level}\t${util.format(message, ...params)}`;
    process.stdout.write(line.replace(/\n/g, '\r') + '\n');
  };
  console.trace = write('TRACE');
  console.debug = write('DEBUG');
  console.info = write('INFO');
  console.log = write('INFO');
  console.warn = write('WARN');
  console.error = write('ERROR');
  console.fatal = write('FATAL');
}

function logError(title, error) {
  console.error(`${title} \t${JSON.stringify(toRapidResponse(error))}`);
}

// --- the Runtime API client --------------------------------------------------------------------------

class RuntimeApiClient {
  constructor(hostPort) {
    const [hostname, port] = String(hostPort).split(':');
    this.hostname = hostname;
    this.port = parseInt(port, 10);
    // One kept-alive connection, as the official client. A free kept-alive socket is unref'd by the
    // agent, so it does not keep the event loop from emptying (callbackWaitsForEmptyEventLoop).
    this.agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  }

  request(method, urlPath, body, headers = {}) {
    return new Promise((resolve, reject) => {
      const options = { hostname: this.hostname, port: this.port, path: API_PREFIX + urlPath, method,
        agent: this.agent, headers };
      if (body !== undefined) {
        options.headers = { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body),
          ...headers };
      }
      const req = http.request(options, (res) => {
        const chunks = [];
        res.on('data', (chunk) => chunks.push(chunk));
        res.on('end', () => resolve({ status: res.statusCode, headers: res.headers,
          body: Buffer.concat(chunks).toString('utf8') }));
        res.on('error', reject);
      });
      req.on('error', reject);
      req.end(body);
    });
  }

  async nextInvocation() {
    const res = await this.request('GET', '/invocation/next');
    if (res.status !== 200) throw new Error(`GET /invocation/next answered ${res.status}: ${res.body}`);
    return { bodyJson: res.body, headers: res.headers };
  }

  async postInvocationResponse(result, id) {
    await this.post(`/invocation/${encodeURIComponent(id)}/response`, serialize(result));
  }

  async postInvocationError(error, id) {
    const response = toRapidResponse(error);
    await this.post(`/invocation/${encodeURIComponent(id)}/error`, serialize(response),
      { [ERROR_TYPE_HEADER]: headerSafe(response.errorType) });
  }

  async postInitError(error) {
    const response = toRapidResponse(error);
    await this.post('/init/error', serialize(response), { [ERROR_TYPE_HEADER]: headerSafe(response.errorType) });
  }

  async post(urlPath, body, headers) {
    const res = await this.request('POST', urlPath, body, headers);
    if (res.status !== 202) throw new Error(`POST ${urlPath} answered ${res.status}: ${res.body}`);
  }
}

function serialize(body) {
  try {
    return JSON.stringify(body === undefined ? null : body);
  } catch (_) {
    throw new Error('Unable to stringify response body');
  }
}

function headerSafe(value) {
  return String(value ?? '').replace(/[^\x20-\x7e]/g, '?');
}

// The Runtime API is the supervisor's: when it is gone or refuses us, this environment is over.
function lostApi(err) {
  process.stderr.write(`lambdaemu bootstrap: Runtime API request failed: ${err && err.message}\n`);
  process.exit(1);
}

// --- loading the handler (UserFunction.js) -----------------------------------------------------------

function splitHandler(fullHandler) {
  if (fullHandler.includes('..')) {
    throw new errorClasses.MalformedHandlerName(`'${fullHandler}' is not a valid handler name. Use absolute `
      + 'paths when specifying root directories in handler names.');
  }
  const handlerString = path.basename(fullHandler);
  const moduleRoot = fullHandler.substring(0, fullHandler.indexOf(handlerString));
  const match = handlerString.match(/^([^.]*)\.(.*)$/);
  if (!match) throw new errorClasses.MalformedHandlerName('Bad handler');
  return [moduleRoot, match[1], match[2]];
}

function packageTypeIsModule(folder) {
  for (let dir = folder; ; dir = path.dirname(dir)) {
    if (dir.endsWith('/node_modules')) return false;
    const pj = path.join(dir, 'package.json');
    if (fs.existsSync(pj)) {
      try {
        return JSON.parse(fs.readFileSync(pj, 'utf8')).type === 'module';
      } catch (_) {
        return false;
      }
    }
    if (dir === path.dirname(dir)) return false;
  }
}

async function loadModule(appRoot, moduleRoot, moduleName) {
  const base = path.resolve(appRoot, moduleRoot, moduleName);
  const tryRequire = (file) => (fs.existsSync(file) ? require(file) : undefined);
  const tryImport = async (file) => (fs.existsSync(file) ? import(pathToFileURL(file).href) : undefined);
  const loaded = tryRequire(base);
  if (loaded) return loaded;
  const esm = fs.existsSync(base + '.js') && packageTypeIsModule(path.dirname(base + '.js'));
  if (!esm) {
    const cjs = tryRequire(base + '.js');
    if (cjs) return cjs;
  }
  const other = (esm && (await tryImport(base + '.js'))) || (await tryImport(base + '.mjs'))
    || tryRequire(base + '.cjs');
  if (other) return other;
  return require(require.resolve(moduleName, { paths: [appRoot, moduleRoot] }));
}

async function loadHandler(appRoot, fullHandler) {
  const [moduleRoot, moduleName, handlerPath] = splitHandler(fullHandler);
  globalThis.awslambda = {
    streamifyResponse: () => {
      throw new errorClasses.MalformedStreamingHandler('response streaming is not supported by lambdaemu');
    },
  };
  let app;
  try {
    app = await loadModule(appRoot, moduleRoot, moduleName);
  } catch (e) {
    if (e instanceof SyntaxError) {
      const wrapped = new errorClasses.UserCodeSyntaxError(String(e));
      wrapped.stack = e.stack;
      throw wrapped;
    }
    if (e && e.code === 'MODULE_NOT_FOUND') {
      const wrapped = new errorClasses.ImportModuleError(String(e));
      wrapped.stack = e.stack;
      throw wrapped;
    }
    throw e;
  }
  const fn = handlerPath.split('.').reduce((obj, key) => obj && obj[key], app);
  if (!fn) throw new errorClasses.HandlerNotFound(`${fullHandler} is undefined or not exported`);
  if (typeof fn !== 'function') throw new errorClasses.HandlerNotFound(`${fullHandler} is not a function`);
  return fn;
}

// --- invocations (Runtime.js, CallbackContext.js) ----------------------------------------------------

let beforeExitListener = () => {};

/** The node-style callback and the context's callback part, each usable once (CallbackContext.build). */
function buildCallbackContext(client, id, scheduleNext) {
  const postError = (err) => {
    logError('Invoke Error', err);
    client.postInvocationError(err, id).then(scheduleNext, lostApi);
  };
  let completed = false;
  const complete = (result) => {
    if (completed) {
      console.error('Invocation has already been reported as done. Cannot call complete more than once per invocation.');
      return;
    }
    completed = true;
    let body;
    try {
      body = serialize(result);
    } catch (err) {
      postError(err);
      return;
    }
    client.post(`/invocation/${encodeURIComponent(id)}/response`, body).then(scheduleNext, lostApi);
  };
  let waitForEmptyEventLoop = true;
  const callback = (err, result) => {
    beforeExitListener = () => {};
    if (err !== undefined && err !== null) {
      postError(err);
    } else if (!waitForEmptyEventLoop) {
      complete(result);
    } else {
      beforeExitListener = () => setImmediate(() => complete(result));
    }
  };
  const done = (err, result) => {
    beforeExitListener = () => {};
    if (err !== undefined && err !== null) postError(err);
    else complete(result);
  };
  const context = {
    get callbackWaitsForEmptyEventLoop() { return waitForEmptyEventLoop; },
    set callbackWaitsForEmptyEventLoop(value) { waitForEmptyEventLoop = value; },
    succeed: (result) => done(null, result),
    fail: (err) => done(err === undefined || err === null ? 'handled' : err, null),
    done,
  };
  let finished = false;
  const once = (fn) => (...args) => {
    if (!finished) {
      fn(...args);
      finished = true;
    }
  };
  context.succeed = once(context.succeed);
  context.fail = once(context.fail);
  context.done = once(context.done);
  return [once(callback), context, () => { completed = true; }];
}

function parseJsonHeader(value, name) {
  if (value === undefined) return undefined;
  try {
    return JSON.parse(value);
  } catch (err) {
    throw new Error(`Cannot parse ${name} as json: ${err}`);
  }
}

function contextData(headers) {
  const deadline = Number(headers['lambda-runtime-deadline-ms']);
  return {
    functionVersion: process.env.AWS_LAMBDA_FUNCTION_VERSION,
    functionName: process.env.AWS_LAMBDA_FUNCTION_NAME,
    memoryLimitInMB: process.env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE,
    logGroupName: process.env.AWS_LAMBDA_LOG_GROUP_NAME,
    logStreamName: process.env.AWS_LAMBDA_LOG_STREAM_NAME,
    clientContext: parseJsonHeader(headers['lambda-runtime-client-context'], 'ClientContext'),
    identity: parseJsonHeader(headers['lambda-runtime-cognito-identity'], 'CognitoIdentity'),
    invokedFunctionArn: headers['lambda-runtime-invoked-function-arn'],
    awsRequestId: headers['lambda-runtime-aws-request-id'],
    getRemainingTimeInMillis: () => deadline - Date.now(),
  };
}

function isPromise(obj) {
  return obj && typeof obj.then === 'function';
}

class Runtime {
  constructor(client, handler, errorCallbacks) {
    this.client = client;
    this.handler = handler;
    this.isAsync = handler.constructor && handler.constructor.name === 'AsyncFunction';
    this.errorCallbacks = errorCallbacks;
  }

  scheduleIteration() {
    setImmediate(() => {
      this.handleOnce().catch((err) => {
        console.log(`Unexpected Top Level Error: ${err}`);
        this.errorCallbacks.uncaughtException(err);
      });
    });
  }

  async handleOnce() {
    let next;
    try {
      next = await this.client.nextInvocation();
    } catch (err) {
      lostApi(err);
    }
    const { bodyJson, headers } = next;
    const id = headers['lambda-runtime-aws-request-id'];
    if (!id) throw new Error('invocation id is missing or invalid');
    currentRequestId = id;
    if (headers['lambda-runtime-trace-id']) process.env._X_AMZN_TRACE_ID = headers['lambda-runtime-trace-id'];
    else delete process.env._X_AMZN_TRACE_ID;

    const [callback, callbackContext, markCompleted] = buildCallbackContext(this.client, id,
      () => this.scheduleIteration());
    try {
      this.setErrorCallbacks(id);
      // If the loop empties before anything settles the invocation: a non-async handler succeeds with
      // null (it "forgot" the callback), an async one fails (its promise can never settle now).
      beforeExitListener = () => {
        markCompleted();
        if (this.isAsync) {
          const error = new errorClasses.NodeJsExit(NODEJS_EXIT_MESSAGE);
          logError('Invoke Error', error);
          this.client.postInvocationError(error, id).then(() => this.scheduleIteration(), lostApi);
        } else {
          this.client.postInvocationResponse(null, id).then(() => this.scheduleIteration(), lostApi);
        }
      };
      const context = Object.assign(callbackContext, contextData(headers));
      const result = this.handler(JSON.parse(bodyJson), context, callback);
      if (isPromise(result)) {
        result.then(context.succeed, context.fail).catch(context.fail);
      }
    } catch (err) {
      callback(err);
    }
  }

  setErrorCallbacks(id) {
    this.errorCallbacks.uncaughtException = (error) => {
      this.client.postInvocationError(error, id).then(() => process.exit(129), lostApi);
    };
    this.errorCallbacks.unhandledRejection = (error) => {
      this.client.postInvocationError(error, id).then(() => process.exit(128), lostApi);
    };
  }
}

// --- start -------------------------------------------------------------------------------------------

async function main() {
  patchConsole();
  const client = new RuntimeApiClient(process.env.AWS_LAMBDA_RUNTIME_API);
  const errorCallbacks = {
    uncaughtException: (error) => client.postInitError(error).then(() => process.exit(129), lostApi),
    unhandledRejection: (error) => client.postInitError(error).then(() => process.exit(128), lostApi),
  };
  process.on('uncaughtException', (error) => {
    logError('Uncaught Exception', error);
    errorCallbacks.uncaughtException(error);
  });
  process.on('unhandledRejection', (reason) => {
    const error = new errorClasses.UnhandledPromiseRejection(String(reason));
    if (reason && reason.stack) error.stack = reason.stack;
    logError('Unhandled Promise Rejection', error);
    errorCallbacks.unhandledRejection(error);
  });
  process.on('beforeExit', () => beforeExitListener());

  const taskRoot = process.env.LAMBDA_TASK_ROOT || process.cwd();
  let handler;
  try {
    handler = await loadHandler(taskRoot, process.env._HANDLER || '');
  } catch (error) {
    logError('Init Error', error);
    errorCallbacks.uncaughtException(error);
    return;
  }
  new Runtime(client, handler, errorCallbacks).scheduleIteration();
}

main();
