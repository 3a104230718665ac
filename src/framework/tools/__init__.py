"""The testbed's own tools: training its model (train_testbed) and its proxy rewards (train_proxy), and evaluating
the model (evaluate_testbed). They rebuild the shipped files; runs never import them."""
