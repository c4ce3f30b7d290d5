"""asv benchmarks of the shallow RMM on scikit-learn's digits: fit time and held-out accuracy."""

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from fastdrmm import RMM


class RMMDigits:
    params = (["soft", "hard"],)
    param_names = ["inference"]
    timeout = 300

    def setup(self, inference):
        digits = load_digits()
        x = digits.images.reshape(-1, 1, 8, 8) / 16.0
        self.x_train, self.x_test, self.y_train, self.y_test = train_test_split(
            x, digits.target, test_size=0.3, random_state=0, stratify=digits.target)
        RMM(10, n_nuisances=2, max_iter=2, random_state=0).fit(self.x_train[:50],
                                                                self.y_train[:50])

    def _fit(self, inference):
        return RMM(10, n_nuisances=8, inference=inference, max_iter=50,
                   random_state=0).fit(self.x_train, self.y_train)

    def time_fit(self, inference):
        self._fit(inference)

    def track_accuracy(self, inference):
        model = self._fit(inference)
        return float(np.mean(model.predict(self.x_test) == self.y_test))

    track_accuracy.unit = "accuracy"
