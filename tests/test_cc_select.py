"""cc_remove's pooling of top-DSA sets over models (hand-made known answers)."""
import numpy as np
import pytest

from cc_remove import choose_corner_cases


def test_pooling_counts_models_and_breaks_ties_by_rank():
    # 3 models × 6 training inputs. top=2 per model:
    # model 0 tops {1, 4}, model 1 tops {1, 2}, model 2 tops {4, 1}  → frequency 1:3, 4:2, 2:1
    dsa = np.array([[0.1, 0.9, 0.2, 0.3, 0.8, 0.0],
                    [0.1, 0.9, 0.8, 0.3, 0.2, 0.0],
                    [0.1, 0.8, 0.2, 0.3, 0.9, 0.0]])
    res = choose_corner_cases(dsa, top=2, n_remove=3)
    assert res["removed"].tolist() == [1, 4, 2]
    assert res["frequency"].tolist() == [0, 3, 1, 0, 2, 0]
    assert res["min_frequency_removed"] == 1
    np.testing.assert_allclose(res["per_model_threshold"], [0.8, 0.8, 0.8])
    # removing more than the union of top sets falls back to the mean DSA rank
    more = choose_corner_cases(dsa, top=2, n_remove=4)
    assert more["removed"].tolist() == [1, 4, 2, 3]  # input 3 has the best mean rank among the rest


def test_remove_count_bounds():
    with pytest.raises(ValueError, match="remove_count must be in"):
        choose_corner_cases(np.zeros((2, 5)), top=2, n_remove=5)
