"""Training: data, metrics and the loop behind `lorakit train`."""
