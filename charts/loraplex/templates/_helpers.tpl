{{/* Chart name, truncated to fit a DNS label. */}}
{{- define "loraplex.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped name: "<release>" if it already contains the chart name, else "<release>-<chart>". */}}
{{- define "loraplex.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "loraplex.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraplex.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "loraplex.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "loraplex.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loraplex
{{- end -}}

{{- define "loraplex.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "loraplex.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "loraplex.peeringName" -}}
{{- default (include "loraplex.fullname" .) .Values.peering.name -}}
{{- end -}}

{{- define "loraplex.tokenSecretName" -}}
{{- default (printf "%s-token-key" (include "loraplex.fullname" .)) .Values.tokenKey.existingSecret -}}
{{- end -}}

{{/* "repository:tag", the tag defaulting to the chart's appVersion, with "@digest" appended
when one is set (the tag then only informs humans). Call with (list image $). */}}
{{- define "loraplex.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- with $image.digest }}@{{ . }}{{ end -}}
{{- end -}}

{{/* The operator pods' selector labels as the k=v,k=v of `--operator-pod-labels`. */}}
{{- define "loraplex.operatorPodLabels" -}}
{{- $labels := include "loraplex.selectorLabels" . | fromYaml -}}
{{- $pairs := list -}}
{{- range $k := keys $labels | sortAlpha -}}
{{- $pairs = append $pairs (printf "%s=%s" $k (index $labels $k)) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{/* The operator's identity in admission requests. */}}
{{- define "loraplex.serviceAccountUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "loraplex.serviceAccountName" .) -}}
{{- end -}}

{{/* The RBAC rule lists, generated from operator/loraplex/rbac.py into files/rbac.yaml. */}}
{{- define "loraplex.rbacRules" -}}
{{- $rbac := .Files.Get "files/rbac.yaml" | fromYaml -}}
{{- if not $rbac.rules -}}
{{- fail "files/rbac.yaml is missing or empty: run `python tests/chart/sync_rbac.py`" -}}
{{- end -}}
{{- toYaml $rbac -}}
{{- end -}}
