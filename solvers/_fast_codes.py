"""The codes the loops of ``fast`` return and its driver reads (:mod:`._fast_kernels` re-exports them)."""

# ssp's statuses: certified optimal, no augmenting path within the candidates, the augmentation budget spent,
# a token without a free candidate column, the certificate rounds spent, stopped by the flag
OK, NO_PATH, BUDGET, NEED_ROOM, ROUNDS, STOPPED = 0, 1, 2, 3, 4, 5
# prepare's answers: nothing over-full (held and lists left unbuilt), built (STOPPED: stopped by the flag)
NOT_BUILT, BUILT = 0, 1
