/// The files `sidecar init NAME` writes: a handler that runs with no requirements, an empty
/// requirements.txt, a commented sidecar.yaml and inputs for `sidecar predict`.
enum ModelTemplate {
    static func files(name: String) -> [(name: String, contents: String, purpose: String)] {
        [
            ("handler.py", handler(name: name), "the handler: class Model, whose predict(batch) gets a list of JSON items"),
            ("requirements.txt", requirements, "pip requirements for the model's own environment (none yet)"),
            ("sidecar.yaml", configuration(name: name), "name, handler, workers, batching (every key: Config/model-sidecar.yaml)"),
            ("sample.jsonl", sample, "three inputs, one JSON value per line, for sidecar predict"),
        ]
    }

    static func handler(name: String) -> String {
        #"""
        """\#(name): a Sidecar model.

        Sidecar imports this module in every worker process, makes one Model per process and calls its
        predict with batches of items. An item is one JSON value: a line of `sidecar predict`, an instance
        of a KServe v1 request ({"instances": [...]}), an item passed to model.predict from Swift.

        This starter needs no packages. It understands two kinds of items:
            {"text": "hello"}         ->  {"upper": "HELLO", "words": 1}
            {"numbers": [1, 2, 3]}    ->  {"sum": 6, "count": 3}
        Replace predict_one (or predict, to work on the whole batch at once, e.g. with numpy) with your
        model, and list what it imports in requirements.txt.
        """


        class Model:
            def __init__(self, context):
                # Runs once per worker process, before its first batch: load weights here, e.g.
                #     self.weights = load(context.model_dir / "weights.bin")
                # context also has worker_index, model_name, logger, and config: the config: mapping
                # of sidecar.yaml.
                self.logger = context.logger
                self.logger.info("worker %d of %s is ready", context.worker_index, context.model_name)

            def predict(self, batch):
                # batch is a list of items; return a list with one result per item, in the same order.
                # Results must be JSON-serializable (numpy arrays and scalars are converted).
                return [self.predict_one(item) for item in batch]

            def predict_one(self, item):
                if isinstance(item, dict) and isinstance(item.get("text"), str):
                    text = item["text"]
                    return {"upper": text.upper(), "words": len(text.split())}
                if isinstance(item, dict) and isinstance(item.get("numbers"), list):
                    numbers = item["numbers"]
                    return {"sum": sum(numbers), "count": len(numbers)}
                # An exception fails only the items that raise it: the other items of the batch still
                # get their predictions, and the worker keeps running.
                raise ValueError('expected {"text": "..."} or {"numbers": [...]}, got ' + repr(item))

        """#
    }

    /// The same text for every model, so that models made by `sidecar init` share one environment
    /// until they list requirements.
    static let requirements = """
        # pip requirements, one per line, as for `pip install -r` (for example: numpy==2.1.3).
        # Sidecar installs them into the model's own environment, built once and cached by the
        # content of this file. The starter handler needs none.

        """

    static func configuration(name: String) -> String {
        """
        # Sidecar settings for \(name). Every key is optional: Config/model-sidecar.yaml (in the Sidecar
        # repository) lists all of them with their defaults and what they do. Unknown keys and bad values
        # stop the model from starting, with a message naming the key.

        # The model's name in URLs (/v2/models/\(name)/infer, /v1/models/\(name):predict) and logs.
        # Letters, digits, '-', '_', '.'; default: the directory's name. See name in Config/model-sidecar.yaml.
        name: "\(name)"

        # The entry point, module:attribute: here the class Model in handler.py, made once per worker
        # process. A function predict(batch) works too. See handler in Config/model-sidecar.yaml.
        handler: handler:Model

        # Python worker processes; batches are spread over them. See workers in Config/model-sidecar.yaml.
        workers: 1

        # How requests are grouped into batches. See batching in Config/model-sidecar.yaml.
        batching:
          # Most items in one call to predict.
          max_batch_size: 64
          # How long a free worker waits for a batch to fill; 0 sends whatever is queued at once.
          max_delay_ms: 0
          # Most items waiting for a worker; past it requests are refused at once.
          max_queue: 10000

        """
    }

    static let sample = """
        {"text": "hello sidecar"}
        {"numbers": [1, 2, 3.5]}
        {"text": "one batch, many items"}

        """
}
