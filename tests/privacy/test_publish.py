"""What a round record publishes under client-level DP (fedtune.privacy.publish): the
attacker reads the published record and wants to know who was sampled."""

from fedtune.privacy.publish import adapter_bytes_by_rank, private_round

RECORD = {
    "round": 2, "train_loss": None, "eval_loss": 3.1, "clients_sampled": 3,
    "clients_replied": 2, "stragglers": 0, "dropouts": 0, "epsilon": 1.2, "delta": 1e-5,
    "noise_multiplier": 1.1, "dp_noise_std": 0.1, "dp_noise_to_signal": 0.5,
    "bytes_up": 40960, "bytes_down": 81920, "bytes_up_dense": 40960,  # ranks sampled
    "seconds": 3.2, "seconds_train_phase": 2.0, "secagg_seconds_collect": 0.4,  # who was slow
    "dropped": ["a sampled client: secure aggregation, train: client 'carol' refuses to "
                "train: noise multiplier 1 is below the floor 100"],
    "refused_names": ["node 7 claims the name 'mallory' but holds no key"],
    "secagg_dropped": 1, "secagg_bits": 24, "sample_epsilon_max": 3.0,
    "a_key_added_later": "client 'carol'",
}


def test_a_private_record_keeps_counts_and_the_mechanisms_numbers_only():
    out = private_round(RECORD)
    assert out == {
        "round": 2, "train_loss": None, "eval_loss": 3.1, "clients_sampled": 3,
        "clients_replied": 2, "stragglers": 0, "dropouts": 0, "epsilon": 1.2,
        "delta": 1e-5, "noise_multiplier": 1.1, "dp_noise_std": 0.1,
        "dp_noise_to_signal": 0.5, "secagg_dropped": 1, "secagg_bits": 24,
        "clients_dropped": 1, "names_refused": 1}
    assert "carol" not in repr(out) and "mallory" not in repr(out)


def test_payload_sizes_follow_from_public_ranks():
    modules = {"q": (64, 64), "v": (64, 32)}  # module -> (in, out)
    assert adapter_bytes_by_rank(modules, {8, 2}) == {
        "2": 4 * 2 * (64 + 64 + 64 + 32), "8": 4 * 8 * (64 + 64 + 64 + 32)}
