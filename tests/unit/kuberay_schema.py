"""A check of the KubeRay `RayJob` fields our recipe uses (apiVersion ray.io/v1).

No KubeRay CRD schema can be fetched here and no PyPI package ships one, so this models the RayJob, RayCluster,
head group and worker group specs by hand from KubeRay's v1 API reference
(https://ray-project.github.io/kuberay/reference/api/): the fields listed there, unknown fields rejected, the
required ones required (`headGroupSpec`, `template`, `groupName`; `rayStartParams`, `minReplicas` and `maxReplicas`
too, which the first v1 CRDs required), `rayStartParams` values as strings (the CRD's type; an unquoted number is
rejected by the API server). The pod templates inside are checked separately against the real Kubernetes schema
(kubernetes-validate), as a core PodTemplate.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


PodTemplate = dict[str, Any]  # checked against Kubernetes' own schema by the test


class HeadGroupSpec(_Strict):
    template: PodTemplate
    rayStartParams: dict[str, str]
    serviceType: Optional[Literal["ClusterIP", "NodePort", "LoadBalancer"]] = None
    enableIngress: Optional[bool] = None
    headService: Optional[dict[str, Any]] = None


class WorkerGroupSpec(_Strict):
    groupName: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    template: PodTemplate
    rayStartParams: dict[str, str]
    minReplicas: int = Field(ge=0)
    maxReplicas: int = Field(ge=0)
    replicas: Optional[int] = Field(None, ge=0)
    numOfHosts: Optional[int] = Field(None, ge=1)
    idleTimeoutSeconds: Optional[int] = None
    scaleStrategy: Optional[dict[str, Any]] = None
    suspend: Optional[bool] = None

    @model_validator(mode="after")
    def _replicas_within_bounds(self) -> "WorkerGroupSpec":
        if self.minReplicas > self.maxReplicas:
            raise ValueError(f"{self.groupName}: minReplicas {self.minReplicas} > maxReplicas {self.maxReplicas}")
        if self.replicas is not None and not self.minReplicas <= self.replicas <= self.maxReplicas:
            raise ValueError(f"{self.groupName}: replicas {self.replicas} outside [minReplicas, maxReplicas]")
        return self


class RayClusterSpec(_Strict):
    headGroupSpec: HeadGroupSpec
    workerGroupSpecs: list[WorkerGroupSpec] = Field(default_factory=list)
    rayVersion: Optional[str] = Field(None, pattern=r"^\d+\.\d+\.\d+$")
    enableInTreeAutoscaling: Optional[bool] = None
    autoscalerOptions: Optional[dict[str, Any]] = None
    headServiceAnnotations: Optional[dict[str, str]] = None
    gcsFaultToleranceOptions: Optional[dict[str, Any]] = None
    suspend: Optional[bool] = None
    managedBy: Optional[str] = None

    @model_validator(mode="after")
    def _distinct_group_names(self) -> "RayClusterSpec":
        names = [g.groupName for g in self.workerGroupSpecs]
        if len(set(names)) != len(names):
            raise ValueError(f"worker group names repeat: {names}")
        return self


class RayJobSpec(_Strict):
    entrypoint: str = Field(min_length=1)
    rayClusterSpec: Optional[RayClusterSpec] = None
    clusterSelector: Optional[dict[str, str]] = None
    runtimeEnvYAML: Optional[str] = None
    shutdownAfterJobFinishes: Optional[bool] = None
    ttlSecondsAfterFinished: Optional[int] = Field(None, ge=0)
    activeDeadlineSeconds: Optional[int] = Field(None, gt=0)
    backoffLimit: Optional[int] = Field(None, ge=0)
    submissionMode: Optional[Literal["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]] = None
    submitterPodTemplate: Optional[PodTemplate] = None
    submitterConfig: Optional[dict[str, Any]] = None
    entrypointNumCpus: Optional[float] = None
    entrypointNumGpus: Optional[float] = None
    entrypointResources: Optional[str] = None
    jobId: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    suspend: Optional[bool] = None
    managedBy: Optional[str] = None
    deletionStrategy: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _one_cluster_source(self) -> "RayJobSpec":
        if (self.rayClusterSpec is None) == (self.clusterSelector is None):
            raise ValueError("give exactly one of rayClusterSpec (a new cluster) and clusterSelector (an existing one)")
        return self


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)


class RayJob(_Strict):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayJob"]
    metadata: Metadata
    spec: RayJobSpec

    def pod_templates(self) -> dict[str, PodTemplate]:
        """Every pod template in the job, by a name for messages."""
        cluster = self.spec.rayClusterSpec
        out = {"head": cluster.headGroupSpec.template} if cluster else {}
        out.update({f"worker group {g.groupName}": g.template for g in (cluster.workerGroupSpecs if cluster else [])})
        if self.spec.submitterPodTemplate:
            out["submitter"] = self.spec.submitterPodTemplate
        return out
