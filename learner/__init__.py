"""adloop learner: UA-SID tokenizer, generative model, pretraining, ONNX export."""
