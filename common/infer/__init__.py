"""Using a trained model: prediction on raw frames, ONNX export, video frames and prediction pictures."""
