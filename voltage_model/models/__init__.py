"""The model classes: CGCNN and its heads, the GP head, composition descriptors, the CHGNet
backbone and the CHGNet physics voltage."""
