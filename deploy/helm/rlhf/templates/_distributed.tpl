{{/*
The PPO trainer on several pods under torchrun (trainer.stages.ppo.distributed), from the dict
"rlhf.workload" takes. One master pod runs rank 0 (control plane, /metrics, Kafka, checkpoints)
and nodes - 1 worker pods only compute; both share the workload's ConfigMap and pod template.

Ranks: c10d rendezvous numbers the pods by sorting their --local-addr, so the master gives the
rendezvous Service's name (<name>-rdzv...) and the workers their pod names (<name>-worker-N):
"rdzv" sorts before "worker", so the master is always node rank 0 and runs RANK 0. The master
also hosts the c10d store (is_host=1) instead of guessing it from DNS, which may not yet list it.
*/}}

{{- define "rlhf.trainer.distributed.rankZero" -}}
{{- if eq .mode "pytorchjob" -}}
training.kubeflow.org/replica-type: master
{{- else -}}
statefulset.kubernetes.io/pod-name: {{ .name }}-0
{{- end -}}
{{- end -}}

{{- define "rlhf.trainer.distributed" -}}
{{- $root := .root -}}
{{- $v := .values -}}
{{- $d := $v.distributed -}}
{{- $name := .name -}}
{{- $gpus := int $v.gpu.count -}}
{{- $procs := int $d.procsPerNode -}}
{{- if eq $procs 0 -}}
{{- $procs = ternary $gpus 1 (gt $gpus 0) -}}
{{- end -}}
{{- if and (gt $gpus 0) (gt $procs $gpus) -}}
{{- fail (printf "%s.distributed.procsPerNode (%d) is above gpu.count (%d): NCCL needs a GPU per process" .where $procs $gpus) -}}
{{- end -}}
{{- /* The trainer refuses at start (crash loop) a batch that does not split over the ranks:
       refuse it at install instead. 8 and 4 are TrainerConfig's defaults (a test compares). */ -}}
{{- $world := mul (int $d.nodes) $procs -}}
{{- $batch := int (($v.env | default dict).RLHF_PPO_BATCH_SIZE | default 8) -}}
{{- $minibatch := int (($v.env | default dict).RLHF_PPO_MINIBATCH_SIZE | default 4) -}}
{{- if or (mod $batch $world) (mod $minibatch $world) -}}
{{- fail (printf "%s.distributed: RLHF_PPO_BATCH_SIZE (%d) and RLHF_PPO_MINIBATCH_SIZE (%d) must split evenly over the %d ranks (nodes x procsPerNode): set them in %s.env" .where $batch $minibatch $world .where) -}}
{{- end -}}
{{- $workerName := printf "%s-worker" $name -}}
{{- /* A StatefulSet's pods carry controller-revision-hash=<name>-<hash>, a 63-character label. */ -}}
{{- if gt (len $workerName) 52 -}}
{{- fail (printf "%s: %s is too long for a StatefulSet (52 characters at most): shorten the release name or set fullnameOverride" .where $workerName) -}}
{{- end -}}
{{- $rdzv := printf "%s-rdzv" $name -}}
{{- $rdzvHost := printf "%s.%s.svc" $rdzv $root.Release.Namespace -}}
{{- $rankZero := include "rlhf.trainer.distributed.rankZero" (dict "mode" $d.mode "name" $name) | fromYaml -}}
{{- $torchrun := list
  (printf "--nnodes=%d" (int $d.nodes))
  (printf "--nproc-per-node=%d" $procs)
  "--rdzv-backend=c10d"
  (printf "--rdzv-endpoint=%s:%d" $rdzvHost (int $d.rendezvousPort))
  (printf "--rdzv-id=%s" $name)
  (printf "--max-restarts=%d" (int $d.maxRestarts))
-}}
{{- $module := list "-m" "services.trainer" -}}
{{- /* The Kubeflow operator finds its container by the name "pytorch" and the master's port by
       "pytorchjob-port" (MASTER_PORT and its Service): the rendezvous port serves for both. */ -}}
{{- $pytorchjob := eq $d.mode "pytorchjob" -}}
{{- $container := ternary "pytorch" .component $pytorchjob -}}
{{- $portName := ternary "pytorchjob-port" "rendezvous" $pytorchjob -}}
{{- $fieldEnv := list (dict "name" "POD_NAME" "fieldPath" "metadata.name") -}}
{{- /* Copies of the workload's dict with their own keys (sprig's merge would keep the
       workload's grpcPort over a 0, which it takes for unset). */ -}}
{{- $master := dict -}}
{{- $worker := dict -}}
{{- $service := dict -}}
{{- range $key, $value := . -}}
{{- $_ := set $master $key $value -}}
{{- $_ := set $worker $key $value -}}
{{- $_ := set $service $key $value -}}
{{- end -}}
{{- $_ := set $service "serviceSelector" $rankZero -}}
{{- $_ := set $master "containerName" $container -}}
{{- $_ := set $master "command" (list "torchrun") -}}
{{- $_ := set $master "args" (concat $torchrun (list "--rdzv-conf=is_host=1" (printf "--local-addr=%s" $rdzvHost)) $module) -}}
{{- $_ := set $master "fieldEnv" $fieldEnv -}}
{{- $_ := set $master "extraPorts" (list (dict "name" $portName "port" (int $d.rendezvousPort))) -}}
{{- $_ := set $master "extraLabels" (dict "rlhf.io/role" "master") -}}
{{- /* Workers serve nothing: no ports and no probes (Kubernetes' gRPC probes would fail on
       them forever). A dead torchrun ends the container, which restarts; a rank stuck in a
       collective times out there, and rank 0's probes watch the job. */ -}}
{{- $_ := set $worker "containerName" $container -}}
{{- $_ := set $worker "command" (list "torchrun") -}}
{{- $_ := set $worker "args" (concat $torchrun (list "--rdzv-conf=is_host=0" "--local-addr=$(POD_NAME)") $module) -}}
{{- $_ := set $worker "fieldEnv" $fieldEnv -}}
{{- $_ := set $worker "ports" list -}}
{{- $_ := set $worker "grpcPort" 0 -}}
{{- $_ := set $worker "extraLabels" (dict "rlhf.io/role" "worker") -}}
{{ include "rlhf.workload.configMap" . }}
---
{{- /* The control plane and /metrics: rank 0 alone. */}}
{{ include "rlhf.workload.service" $service }}
---
{{- /* DNS for the rendezvous endpoint, listed before the master is ready (it becomes ready
       only once every pod has joined). ServiceMonitors skip it (rlhf.io/rendezvous). */}}
apiVersion: v1
kind: Service
metadata:
  name: {{ $rdzv }}
  labels:
    {{- include "rlhf.commonLabels" $root | nindent 4 }}
    {{- include "rlhf.workload.selector" . | nindent 4 }}
    rlhf.io/rendezvous: "true"
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector:
    {{- include "rlhf.workload.selector" . | nindent 4 }}
    {{- toYaml $rankZero | nindent 4 }}
  ports:
    - name: rendezvous
      port: {{ $d.rendezvousPort }}
      targetPort: {{ $d.rendezvousPort }}
      protocol: TCP
{{- if $root.Values.networkPolicy.enabled }}
---
{{- /* The ranks talk to each other on ports torch picks (c10d store, gloo, NCCL). */}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ $name }}-ranks
  labels:
    {{- include "rlhf.commonLabels" $root | nindent 4 }}
    {{- include "rlhf.workload.selector" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "rlhf.workload.selector" . | nindent 6 }}
  policyTypes: [Ingress]
  ingress:
    - from:
        - podSelector:
            matchLabels:
              {{- include "rlhf.workload.selector" . | nindent 14 }}
{{- end }}
{{- if $pytorchjob }}
---
{{- /* Restart policy Always: the trainer never finishes, and a master that exits 0 on SIGTERM
       (node drain) must not mark the job Succeeded and stop training. */}}
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata:
  name: {{ $name }}
  labels:
    {{- include "rlhf.commonLabels" $root | nindent 4 }}
    {{- include "rlhf.workload.selector" . | nindent 4 }}
spec:
  nprocPerNode: {{ $procs | quote }}
  pytorchReplicaSpecs:
    Master:
      replicas: 1
      restartPolicy: Always
      template:
        {{- include "rlhf.workload.podTemplate" $master | nindent 8 }}
    {{- if gt (int $d.nodes) 1 }}
    Worker:
      replicas: {{ sub (int $d.nodes) 1 }}
      restartPolicy: Always
      template:
        {{- include "rlhf.workload.podTemplate" $worker | nindent 8 }}
    {{- end }}
{{- else }}
{{- range $set := list (dict "name" $name "replicas" 1 "pod" $master "role" "master") (dict "name" $workerName "replicas" (sub (int $d.nodes) 1) "pod" $worker "role" "worker") }}
{{- if gt (int $set.replicas) 0 }}
---
{{- /* Parallel: every pod starts at once (rendezvous needs them all). A StatefulSet never
       runs two pods of one name, so the master is replaced, never doubled, as Recreate does. */}}
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {{ $set.name }}
  labels:
    {{- include "rlhf.commonLabels" $root | nindent 4 }}
    {{- include "rlhf.workload.selector" $set.pod | nindent 4 }}
spec:
  serviceName: {{ $rdzv }}
  replicas: {{ $set.replicas }}
  podManagementPolicy: Parallel
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "rlhf.workload.selector" $set.pod | nindent 6 }}
      rlhf.io/role: {{ $set.role }}
  template:
    {{- include "rlhf.workload.podTemplate" $set.pod | nindent 4 }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}
