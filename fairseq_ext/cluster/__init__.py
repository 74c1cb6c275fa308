"""c-BTM: unsupervised domains by balanced k-means over tf-idf + SVD document embeddings.

numpy and scikit-learn only (no fairseq, no torch). Documents are read with
``launcher.contract.corpus``, the reader ``btm data prepare`` uses. Modules, in data-flow
order: ``tfidf`` (embedding) -> ``kmeans`` (balanced k-means) -> ``fit`` (sample + fit) ->
``model_io`` (json/npz model) -> ``assign`` (sharded assignment, per-cluster domains,
report) -> ``routing`` (test-time expert weights); ``pipeline`` ties fit and assign together
for the launcher.
"""
from fairseq_ext.cluster.assign import AssignSettings, assign_corpus, assign_shard, merge_shards
from fairseq_ext.cluster.fit import FitSettings, fit_clusters, fit_corpus
from fairseq_ext.cluster.kmeans import balanced_assign, balanced_kmeans, nearest_centre
from fairseq_ext.cluster.model_io import ClusterModel, load_model, save_model
from fairseq_ext.cluster.pipeline import build_cluster_domains
from fairseq_ext.cluster.routing import route_weights, token_route_weights, token_route_weights_from_ids

__all__ = ["AssignSettings", "ClusterModel", "FitSettings", "assign_corpus", "assign_shard",
           "balanced_assign", "balanced_kmeans", "build_cluster_domains", "fit_clusters",
           "fit_corpus", "load_model", "merge_shards", "nearest_centre", "route_weights",
           "save_model", "token_route_weights", "token_route_weights_from_ids"]
